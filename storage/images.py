"""Decode untrusted PNG/JPEG bytes into uint8 arrays, fast.

The hot path is hundreds of thousands of tiny 8-bit PNGs, so those go through
pyspng (libspng; ~5x Pillow end to end here) when installed; everything else goes through
Pillow. libspng is run with CRC checks off, and Pillow never checks IDAT CRCs
either, so every PNG's chunk CRCs are verified here first: a flipped bit is an
error on both paths, never silently wrong pixels.

Mode rules (result is (H, W) for channels=1, (H, W, 3) for channels=3):

=====================  ==========================  ==========================
source mode            channels=1                  channels=3
=====================  ==========================  ==========================
L                      as is                       replicated to 3 channels
1                      0 / 255                     replicated
I;16, I;16B, I         round(v * 255 / 65535)      replicated
16-bit RGB, RGBA, LA   each channel round(v * 255 / 65535), then as the 8-bit mode (libspng:
                       Pillow would keep only the high byte)
LA, La                 alpha dropped               alpha dropped, replicated
P (palette)            via its RGB(A) palette, then as RGB / RGBA
RGB                    Pillow convert("L") luma    as is
RGBA                   luma of RGB, alpha ignored  alpha ignored (not composited)
CMYK, YCbCr, other     Pillow convert("RGB"), then as RGB
=====================  ==========================  ==========================
"""
from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile

from pixelsim.storage.errors import ImageError, MemberChanged, shown

try:  # optional accelerator; Pillow handles everything without it
    import pyspng as _spng
    from pyspng import _pyspng_c as _spng_c
    _SPNG_FORMATS = {1: _spng_c.SPNG_FMT_G8, 3: _spng_c.SPNG_FMT_RGB8, 4: _spng_c.SPNG_FMT_RGBA8}
except Exception:  # noqa: BLE001 - a broken build must not break decoding
    _spng = None

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_SUFFIXES = tuple(IMAGE_SUFFIXES)
MAX_PIXELS = 64 * 1024 * 1024
# A reduced-scale JPEG decode stops at twice the target size or more, so the final bilinear
# resize still averages over its footprint (stopping at the target size itself was faster but
# about twice as far from the full decode); speed and difference: `python -m bench.run`, section J
DRAFT_MARGIN = 2
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SPNG_CHANNELS = {0: 1, 2: 3, 6: 4}  # PNG colour type -> channels, 8-bit only
_CHUNK = struct.Struct(">I4s").unpack_from  # length, type
_U32 = struct.Struct(">I").unpack_from
_IHDR = struct.Struct(">IIBB").unpack_from  # width, height, bit depth, colour type
_IHDR_AT_8 = b"\x00\x00\x00\rIHDR"      # the first chunk's length (13) and type
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk: empty, so always this CRC


def decoder_name() -> str:
    """Which library the PNG fast path uses in this environment."""
    return "pyspng" if _spng is not None else "pillow"


def _sniff(data: bytes) -> str | None:
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    return None


def _check_png(data: bytes, name: str) -> tuple[int, int, int, int, bool]:
    """Verify every chunk's CRC; return (w, h, depth, colour type, animated).

    Catches truncation and bit flips that libspng (CRC checks off) and Pillow
    (skips IDAT CRCs, stops inflating before the Adler-32) would let through.
    """
    header = _one_idat(data)
    return (*header, False) if header is not None else _walk_png(data, name)


def _one_idat(data: bytes) -> tuple[int, int, int, int] | None:
    """(w, h, depth, colour type) of a PNG made of IHDR, one IDAT and IEND, every CRC right and
    under the pixel cap, checked at three fixed places (IEND, empty, has a constant CRC); None
    for anything else, which the walk then checks (and names the fault of)."""
    n = len(data)
    if n >= 57 and data.startswith(_IHDR_AT_8, 8) and data.endswith(_IEND):
        length, kind = _CHUNK(data, 33)
        if (kind == b"IDAT" and length == n - 57 and zlib.crc32(data[12:29]) == _U32(data, 29)[0]
                and zlib.crc32(data[37:n - 16]) == _U32(data, n - 16)[0]):
            header = _IHDR(data, 16)
            if header[0] * header[1] <= MAX_PIXELS:
                return header
    return None


def _common_png(data: bytes, channels: int, size: tuple[int, int] | None) -> np.ndarray | None:
    """The usual dataset image in one step: a one-IDAT PNG (see `_one_idat`), 8-bit gray for
    channels=1 or RGB for channels=3, already of `size`; the same pixels `decode` gives it, or
    None for any other file (which then takes `decode`)."""
    if _spng is None or not data.startswith(_PNG_MAGIC) or (header := _one_idat(data)) is None:
        return None
    w, h, depth, ctype = header
    if depth != 8 or ctype != (0 if channels == 1 else 2) or (size is not None and (h, w) != tuple(size)):
        return None
    try:
        arr = _spng_c.spng_decode_image_bytes(data, _SPNG_FORMATS[channels])
    except Exception:  # noqa: BLE001 - decode() gives the authoritative error
        return None
    if arr.itemsize != 1 or arr.shape != (h, w, channels):   # (G8 and RGB8 are uint8: itemsize is the cheap check)
        return None
    return arr.reshape(h, w) if channels == 1 else arr


def _walk_png(data: bytes, name: str) -> tuple[int, int, int, int, bool]:
    n, pos, header, animated = len(data), 8, None, False
    while True:
        if pos + 12 > n:
            raise ImageError(f"{name}: truncated PNG (file ends before the IEND chunk)")
        length, kind = _CHUNK(data, pos)
        end = pos + 12 + length
        if end > n:
            raise ImageError(f"{name}: truncated PNG ({kind!r} chunk runs past the end of the file)")
        if zlib.crc32(data[pos + 4:end - 4]) != _U32(data, end - 4)[0]:
            raise ImageError(f"{name}: corrupt PNG ({kind!r} chunk fails its CRC check)")
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise ImageError(f"{name}: corrupt PNG (first chunk is not a valid IHDR)")
            header = _IHDR(data, pos + 8)
            if header[0] * header[1] > MAX_PIXELS:
                raise ImageError(f"{name}: {header[0]}x{header[1]} pixels exceeds the cap of "
                                 f"{MAX_PIXELS} (decompression bomb?)")
        elif kind == b"acTL":
            animated = True
        elif kind == b"IEND":
            return (*header, animated)
        pos = end


def _spng_decode16(data: bytes, w: int, h: int, ctype: int) -> np.ndarray | None:
    """A 16-bit colour or gray+alpha PNG, each channel rounded to 8 bits (Pillow truncates
    these to their high byte); None = use Pillow."""
    try:   # pyspng's own load() offers no 16-bit output format; its C binding does
        arr = _spng_c.spng_decode_image_bytes(data, _spng_c.SPNG_FMT_RGBA16)
    except Exception:  # noqa: BLE001 - Pillow gives the authoritative error
        return None
    if arr.dtype != np.uint16 or arr.shape != (h, w, 4):
        return None
    keep = arr[:, :, :3] if ctype in (2, 6) else arr[:, :, 0]
    return ((keep.astype(np.uint32) + 128) // 257).astype(np.uint8)   # = round(v * 255 / 65535)


def _spng_decode(data: bytes, w: int, h: int, depth: int, ctype: int) -> np.ndarray | None:
    """libspng for the shapes it is verified identical to Pillow on; None = use Pillow."""
    if _spng is not None and depth == 16 and ctype in (2, 4, 6):
        return _spng_decode16(data, w, h, ctype)
    nc = _SPNG_CHANNELS.get(ctype)
    if _spng is None or depth != 8 or nc is None:
        return None
    try:   # pyspng's C binding with the format fixed (its load() picks it from the header again)
        arr = _spng_c.spng_decode_image_bytes(data, _SPNG_FORMATS[nc])
    except Exception:  # noqa: BLE001 - Pillow gives the authoritative error
        return None
    if arr.dtype != np.uint8 or arr.shape != (h, w, nc):
        return None
    return arr[:, :, 0] if nc == 1 else arr


def _pillow_decode(data: bytes, name: str, fmt: str, draft: tuple[int, int] | None = None) -> np.ndarray:
    """Decode with Pillow into uint8 L (H, W), RGB or RGBA (H, W, C). With `draft` (H, W), a
    JPEG is decoded at the smallest of libjpeg's scales (1/2, 1/4, 1/8) that is still at
    least DRAFT_MARGIN times that size, which skips most of the inverse DCT work of a large image."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped it globally: refuse partial pixels
        raise ImageError(f"{name}: refusing to decode while PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # DecompressionBombWarning & co. become errors
            im = Image.open(io.BytesIO(data), formats=[fmt])
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{name}: {im.width}x{im.height} pixels exceeds the cap of "
                                 f"{MAX_PIXELS} (decompression bomb?)")
            if getattr(im, "n_frames", 1) > 1:
                raise ImageError(f"{name}: has {im.n_frames} frames; only single-frame images are supported")
            if draft is not None and fmt == "JPEG":
                im.draft(im.mode, (draft[1] * DRAFT_MARGIN, draft[0] * DRAFT_MARGIN))
            im.load()  # Pillow opens lazily: force the whole decode inside the try
            mode = im.mode
            if mode == "P":
                rgba = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
                im, mode = im.convert("RGBA" if rgba else "RGB"), "RGB"
            if mode in ("L", "RGB", "RGBA"):
                return np.array(im)
            if mode == "1":
                return np.array(im.convert("L"))
            if mode in ("LA", "La"):
                return np.array(im.getchannel(0))
            if mode in ("I;16", "I;16L", "I;16B", "I"):
                v = np.asarray(im).astype(np.int64)
                if v.size and (v.min() < 0 or v.max() > 65535):
                    raise ImageError(f"{name}: mode {mode} values outside 0..65535")
                return ((v + 128) // 257).astype(np.uint8)  # = round(v * 255 / 65535), no ties
            return np.array(im.convert("RGB"))
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad input
        raise ImageError(f"{name}: cannot decode {fmt}: {type(e).__name__}: {e}") from e


def decode(data: bytes, name: str, *, channels: int = 1, size: tuple[int, int] | None = None,
           resize: bool = False, draft: bool = False) -> np.ndarray:
    """Decode one image file's bytes into a C-contiguous uint8 array (see module table).

    ``size`` is (H, W); a mismatch is an ImageError unless ``resize`` (bilinear). With
    ``resize`` and ``draft``, a JPEG larger than ``size`` decodes at a reduced scale first
    (libjpeg's DCT scaling), then is resized: several times faster for large photos, pixels
    within a few levels of a full decode's (see the README); without ``draft`` it is exact.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    dot = name.rfind(".")
    suffix = name[dot:].lower() if dot > max(name.rfind("/"), name.rfind("\\")) + 1 else ""
    name = shown(name)   # from here on, only for messages
    fmt = IMAGE_SUFFIXES.get(suffix)
    if fmt is None:
        raise ImageError(f"{name}: unknown image extension {suffix or '(none)'!r}; "
                         f"expected one of {sorted(IMAGE_SUFFIXES)}")
    if not data:
        raise ImageError(f"{name}: empty file")
    actual = _sniff(data)
    if actual is None:
        raise ImageError(f"{name}: not a PNG or JPEG image (unrecognised leading bytes {data[:8]!r})")
    if actual != fmt:
        raise ImageError(f"{name}: content is {actual} but extension says {fmt}")
    arr = None
    if fmt == "PNG":
        w, h, depth, ctype, animated = _check_png(data, name)
        if not animated:  # Pillow reports the frame count
            arr = _spng_decode(data, w, h, depth, ctype)
    if arr is None:
        arr = _pillow_decode(data, name, fmt, draft=tuple(size) if draft and resize and size is not None else None)
    if arr.ndim == 3:
        rgb = arr[:, :, :3]  # alpha ignored, not composited
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L")) if channels == 1 else rgb
    elif channels == 3:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if size is not None and arr.shape[:2] != tuple(size):
        if not resize:
            raise ImageError(f"{name}: expected size {size[0]}x{size[1]} (HxW), "
                             f"got {arr.shape[0]}x{arr.shape[1]}")
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize(
            (size[1], size[0]), Image.Resampling.BILINEAR))
    if not (arr.flags.c_contiguous and arr.flags.writeable):  # views and Pillow's read-only buffers
        arr = arr.copy()
    return arr


def decode_members(items: list[tuple[str, str, bytes]], *, channels: int = 1,
                   size: tuple[int, int] | None = None, resize: bool = False, draft: bool = False
                   ) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Decode (name, sha256, bytes) items whose bytes must still hash to the digest recorded
    when they were unpacked; returns (images, indices of the good items, errors).

    A batch at a time, so a process pool pays one round trip per batch, not per image.
    """
    images, kept, errors = [], [], []
    for i, (name, sha256, data) in enumerate(items):
        try:
            lower = name.lower()
            if not lower.endswith(_SUFFIXES):   # its bytes were never stored
                decode(data, name)   # raises the ImageError naming the extension
            if hashlib.sha256(data).hexdigest() != sha256:   # the cache is damaged, not the image
                raise MemberChanged(f"{shown(name)}: its bytes in the unpacked archive changed since it was unpacked")
            arr = _common_png(data, channels, size) if lower.endswith(".png") else None
            images.append(arr if arr is not None else
                          decode(data, name, channels=channels, size=size, resize=resize, draft=draft))
            kept.append(i)
        except ImageError as e:
            errors.append(str(e))
    return images, kept, errors


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes for a uint8 (H, W) or (H, W, 3) array, e.g. template images."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"encode_png needs uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def peek_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) from the header alone, or None if unreadable (decode() will say why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        return h, w
    except Exception:  # noqa: BLE001 - any failure here is reported by decode()
        return None
