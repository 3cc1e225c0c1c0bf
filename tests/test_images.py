"""storage.images: pixel-exact decoding, mode rules, and refusal of bad input on both paths."""
from __future__ import annotations

import io
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pixelsim.storage import images
from pixelsim.storage.errors import ImageError
from pixelsim.storage.images import decode, decoder_name, encode_png

TINY = Path(__file__).parent / "data" / "mnist_tiny.tgz"
RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def save(im: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(im) if isinstance(im, np.ndarray) else im).save(buf, format=fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(params=["fast", "pillow"])
def path(request, monkeypatch) -> str:
    """Run a test on the pyspng fast path and on the Pillow fallback."""
    if request.param == "fast":
        pytest.importorskip("pyspng")
        assert decoder_name() == "pyspng"
    else:
        monkeypatch.setattr(images, "_spng", None)
        assert decoder_name() == "pillow"
    return request.param


def test_gray_round_trip_exact(path):
    out = decode(save(GRAY), "a/b/x.png")
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, GRAY)
    np.testing.assert_array_equal(decode(save(GRAY), "x.PNG", channels=3), np.stack([GRAY] * 3, axis=2))


def test_gray_with_trns_ignores_transparency(path):
    np.testing.assert_array_equal(decode(save(Image.fromarray(GRAY), transparency=0), "x.png"), GRAY)


def test_rgb(path):
    data = save(RGB)
    np.testing.assert_array_equal(decode(data, "x.png", channels=3), RGB)
    luma = decode(data, "x.png")
    np.testing.assert_array_equal(luma, np.asarray(Image.fromarray(RGB).convert("L")))
    r, g, b = (RGB[0, 0].astype(int))
    assert luma[0, 0] == (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # ITU-R 601-2


def test_rgba_alpha_ignored(path):
    rgba = np.dstack([RGB, RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)])
    data = save(rgba)
    np.testing.assert_array_equal(decode(data, "x.png", channels=3), RGB)
    np.testing.assert_array_equal(decode(data, "x.png"), np.asarray(Image.fromarray(RGB).convert("L")))


@pytest.mark.parametrize("transparency", [None, 1])
def test_palette_uses_its_colours(transparency):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    im.putpalette([10, 20, 30, 200, 100, 0, 255, 255, 255])
    data = save(im, **({} if transparency is None else {"transparency": transparency}))
    rgb = decode(data, "p.png", channels=3)
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [200, 100, 0]
    assert rgb[1, 0].tolist() == [255, 255, 255]
    gray = decode(data, "p.png")
    assert gray.shape == (2, 2) and gray[1, 0] == 255
    assert gray[0, 1] == (200 * 19595 + 100 * 38470 + 0x8000) >> 16


def test_16bit_is_scaled_not_clipped():
    im = Image.fromarray(np.array([[0, 257], [65535, 32768]], dtype=np.uint16))
    assert im.mode == "I;16"
    assert decode(save(im), "d.png").tolist() == [[0, 1], [255, 128]]
    assert decode(save(im), "d.png", channels=3)[1, 1].tolist() == [128] * 3


@pytest.mark.parametrize("ctype,channels", [(2, 3), (6, 4), (4, 2)], ids=["rgb16", "rgba16", "la16"])
def test_16bit_colour_is_rounded_not_truncated(ctype, channels):
    """Pillow keeps only the high byte of a 16-bit colour PNG; every channel is rounded instead."""
    v = np.array([[129, 9129, 32896], [65535, 0, 12129]], dtype=np.uint16)    # 129 rounds to 1, truncates to 0
    a = np.stack([v, v[::-1], v[:, ::-1], np.full_like(v, 65535)][:channels], axis=2)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 16, ctype, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    rounded = ((a.astype(np.int64) + 128) // 257).astype(np.uint8)
    want3 = rounded[:, :, :3] if ctype in (2, 6) else np.repeat(rounded[:, :, :1], 3, axis=2)
    assert np.array_equal(decode(png, "x.png", channels=3), want3)
    gray = decode(png, "x.png", channels=1)
    if ctype == 4:
        assert np.array_equal(gray, rounded[:, :, 0])
    else:
        assert np.array_equal(gray, np.asarray(Image.fromarray(want3).convert("L")))


def test_mode_1_and_la():
    bits = np.array([[True, False], [False, True]])
    assert decode(save(Image.fromarray(bits)), "b.png").tolist() == [[255, 0], [0, 255]]
    la = Image.merge("LA", [Image.fromarray(GRAY), Image.fromarray(GRAY[::-1].copy())])
    np.testing.assert_array_equal(decode(save(la), "la.png"), GRAY)


@pytest.mark.parametrize("name", ["x.jpg", "y.JPEG"])
def test_jpeg_accepted(name):
    assert decode(save(RGB, "JPEG", quality=95), name).shape == (20, 30)
    assert decode(save(RGB, "JPEG"), name, channels=3).shape == (20, 30, 3)
    cmyk = decode(save(Image.fromarray(RGB).convert("CMYK"), "JPEG"), name, channels=3)
    assert cmyk.shape == (20, 30, 3) and abs(int(cmyk.mean()) - int(RGB.mean())) < 20
    gray = decode(save(GRAY, "JPEG", quality=100), name)
    assert np.abs(gray.astype(int) - GRAY).max() < 40  # lossy, but the real pixels


@pytest.mark.parametrize("data, name, message", [
    (save(RGB, "JPEG"), "d/x.png", "d/x.png: content is JPEG but extension says PNG"),
    (save(GRAY), "d/x.jpg", "d/x.jpg: content is PNG but extension says JPEG"),
    (b"", "d/x.png", "d/x.png: empty file"),
    (b"hello, world\n", "d/x.png", "d/x.png: not a PNG or JPEG"),
    (save(GRAY), "d/x.gif", "d/x.gif: unknown image extension '.gif'"),
    (save(GRAY), "d/README", "unknown image extension '(none)'"),
    (save(RGB, "JPEG")[:300], "d/t.jpg", "d/t.jpg: cannot decode JPEG"),
])
def test_refused(data, name, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(data, name)


@pytest.mark.parametrize("cut", ["half", "no_iend"])
def test_truncated_png(path, cut):
    data = save(GRAY)
    message = "runs past the end" if cut == "half" else "file ends before the IEND chunk"
    with pytest.raises(ImageError, match=f"t.png: truncated PNG .*{message}"):
        decode(data[: len(data) // 2 if cut == "half" else -12], "t.png")


def test_flipped_idat_byte_fails_crc(path):
    data = bytearray(save(GRAY))
    start = data.index(b"IDAT") + 4
    data[start + (int.from_bytes(data[start - 8:start - 4], "big")) // 2] ^= 0x01
    with pytest.raises(ImageError, match=r"c.png: corrupt PNG \(b'IDAT' chunk fails its CRC check\)"):
        decode(bytes(data), "c.png")


def test_every_flipped_bit_of_a_one_idat_png_is_an_error_or_the_same_pixels(path):
    """Most PNGs are IHDR, one IDAT, IEND, checked by a shortcut; a flipped bit anywhere in such a
    file (length fields, chunk types, CRCs, the end marker) must still be caught or harmless."""
    data = save(GRAY)
    assert data.count(b"IDAT") == 1 and data.endswith(b"IEND\xaeB`\x82")
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= bit
            try:
                out = decode(bytes(flipped), "f.png")
            except ImageError:
                continue
            np.testing.assert_array_equal(out, GRAY, err_msg=f"byte {i} bit {bit:#x}")


def test_size_mismatch_and_resize(path):
    with pytest.raises(ImageError, match=r"s.png: expected size 32x32 \(HxW\), got 28x28"):
        decode(save(GRAY), "s.png", size=(32, 32))
    assert decode(save(GRAY), "s.png", size=(28, 28)).shape == (28, 28)
    out = decode(save(np.full((28, 28), 77, np.uint8)), "s.png", size=(14, 40), resize=True)
    assert out.shape == (14, 40) and (out == 77).all()
    bilinear = np.asarray(Image.fromarray(GRAY).resize((40, 14), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode(save(GRAY), "s.png", size=(14, 40), resize=True), bilinear)
    assert decode(save(RGB), "s.png", channels=3, size=(10, 15), resize=True).shape == (10, 15, 3)


def test_animated_png_refused(path):
    frames = [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]
    data = save(frames[0], save_all=True, append_images=frames[1:])
    assert b"acTL" in data
    with pytest.raises(ImageError, match="a.png: has 2 frames"):
        decode(data, "a.png")


def test_decompression_bomb_refused_quickly(path):
    w = h = 20000  # a real, valid 1-bit PNG: 400 Mpx from ~50 kB
    deflate = zlib.compressobj(9)
    rows = b"\x00" * ((1 + w // 8) * 1000)
    idat = b"".join(deflate.compress(rows) for _ in range(h // 1000)) + deflate.flush()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    assert len(data) < 200_000
    t = time.perf_counter()
    with pytest.raises(ImageError, match="bomb.png: 20000x20000 pixels exceeds the cap"):
        decode(data, "bomb.png")
    assert time.perf_counter() - t < 0.5


def test_pixel_cap_and_truncation_flag_on_pillow_path(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="big.jpg: 30x20 pixels exceeds the cap"):
        decode(save(RGB, "JPEG"), "big.jpg")
    monkeypatch.setattr(images, "MAX_PIXELS", 64 << 20)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES"):
        decode(save(RGB, "JPEG")[:300], "t.jpg")


def test_mnist_tiny_matches_pillow(path):
    with tarfile.open(TINY) as tar:
        pngs = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.endswith(".png")]
    assert len(pngs) > 1000
    for name, data in pngs:
        np.testing.assert_array_equal(decode(data, name), np.asarray(Image.open(io.BytesIO(data))), err_msg=name)


def test_encode_png_round_trip():
    np.testing.assert_array_equal(decode(encode_png(GRAY), "t.png"), GRAY)
    np.testing.assert_array_equal(decode(encode_png(RGB[:, ::-1]), "t.png", channels=3), RGB[:, ::-1])
    with pytest.raises(ValueError):
        encode_png(GRAY.astype(np.float32))
    with pytest.raises(ValueError):
        decode(encode_png(GRAY), "t.png", channels=2)


def photo(h: int, w: int, seed: int = 0) -> bytes:
    """A smooth colour JPEG, like a photo rather than noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return save(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), "JPEG", quality=92)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_reduced_scale_decode_is_close_to_the_exact_one(channels):
    """--resize decodes large JPEGs at a reduced scale: the same shape, pixels within a few
    levels of full decode + resize; exact mode is full decode + resize, bit for bit."""
    size = (28, 28)
    for h, w in ((480, 640), (300, 257), (96, 64)):
        data = photo(h, w)
        exact = decode(data, "a.jpg", channels=channels, size=size, resize=True)
        fast = decode(data, "a.jpg", channels=channels, size=size, resize=True, draft=True)
        full = np.asarray(Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB"))
        want = np.asarray(Image.fromarray(full).resize(size[::-1], Image.Resampling.BILINEAR))
        assert np.array_equal(exact, want)
        assert fast.shape == exact.shape == want.shape and fast.dtype == np.uint8
        diff = np.abs(fast.astype(int) - exact.astype(int))
        assert diff.mean() < 6 and np.percentile(diff, 99) < 24, (h, w, diff.mean(), diff.max())
        if max(h / size[0], w / size[1]) < 2 * images.DRAFT_MARGIN:   # no smaller scale is large enough
            assert np.array_equal(fast, exact)


def test_jpeg_draft_changes_nothing_without_resize_or_for_a_png():
    data = photo(120, 160)
    assert np.array_equal(decode(data, "a.jpg", draft=True), decode(data, "a.jpg"))
    png = save(RGB)
    assert np.array_equal(decode(png, "a.png", size=(10, 10), resize=True, draft=True),
                          decode(png, "a.png", size=(10, 10), resize=True))


def test_jpeg_draft_still_refuses_a_truncated_file():
    data = photo(480, 640)
    with pytest.raises(ImageError, match="a.jpg: cannot decode JPEG"):
        decode(data[: len(data) // 2], "a.jpg", size=(28, 28), resize=True, draft=True)


def test_the_stored_suffixes_are_the_decodable_ones():
    from pixelsim.storage.archive import STORED_SUFFIXES
    assert set(STORED_SUFFIXES) == set(images.IMAGE_SUFFIXES)
