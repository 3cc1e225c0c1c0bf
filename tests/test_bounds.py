"""A run's memory follows from its options and the image shape, never from the input's size:
shards are cut by pixel bytes, and the peak-memory formula is checked before any decoding."""
from __future__ import annotations

import pytest

from conftest import TINY_FIGURES, assert_figures, plain_pipeline
from pixelsim.storage.errors import OptionError
from pixelsim.tasks import bounds
from pixelsim.tasks.bounds import plan_bounds


def test_shards_are_cut_by_pixel_bytes_as_well_as_by_count(monkeypatch):
    monkeypatch.delenv(bounds.SHARD_BYTES_ENV, raising=False)
    monkeypatch.setenv(bounds.MAX_MEMORY_ENV, str(1 << 40))
    assert plan_bounds((28, 28), 10, 5000, 2).shard_images == 5000
    assert plan_bounds((4096, 4096, 3), 2, 5000, 2).shard_images == bounds.SHARD_BYTES // (4096 * 4096 * 3) == 5
    assert plan_bounds((16384, 16384, 3), 2, 5000, 2).shard_images == 1     # one image always fits
    monkeypatch.setenv(bounds.SHARD_BYTES_ENV, str(784 * 50))
    assert plan_bounds((28, 28), 10, 5000, 2).shard_images == 50


def test_a_peak_over_the_limit_fails_before_decoding_naming_what_to_change(monkeypatch):
    monkeypatch.setenv(bounds.MAX_MEMORY_ENV, str(16 << 30))
    with pytest.raises(OptionError) as e:
        plan_bounds((8192, 8192, 3), 10, 5000, 2)
    text = str(e.value)
    assert "8192x8192x3" in text and "10 classes" in text and "templates step" in text
    assert "--resize" in text and "PIXELSIM_MAX_MEMORY" in text and "\n" not in text
    peak = plan_bounds((8192, 8192, 3), 2, 5000, 2).peak_bytes          # two classes fit in 16 GiB
    w = 8192 * 8192 * 3
    assert peak == bounds.BASE + 2 * w + 24 * 2 * w + 16 * w             # templates: one image per shard
    # the plan's index and sort grow with the archive's members (its cap bounds them)
    assert plan_bounds((28, 28), 2, 5000, 2, members=10**6).peak_bytes == (
        plan_bounds((28, 28), 2, 5000, 2).peak_bytes + bounds.PLAN * 10**6)
    with pytest.raises(OptionError, match="in an archive of 50,000,000 members need about 19.1 GiB"):
        plan_bounds((28, 28), 2, 5000, 2, members=50 * 10**6)
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(bounds.MAX_MEMORY_ENV, bad)
        with pytest.raises(OptionError, match=f"PIXELSIM_MAX_MEMORY={bad!r}: expected a whole number, at least 1"):
            plan_bounds((28, 28), 2, 5000, 1)


def test_a_run_with_small_shard_bytes_has_more_shards_and_the_same_figures(tmp_path, monkeypatch):
    monkeypatch.setenv(bounds.SHARD_BYTES_ENV, str(784 * 50))
    out = plain_pipeline(str(tmp_path / "root"), shard_size=300)
    assert len(out.outputs.shards.shards["train"]) == 14 and len(out.outputs.shards.shards["valid"]) == 14
    assert_figures(out.report, TINY_FIGURES)


def test_a_run_over_the_memory_limit_stops_before_convert(tmp_path, monkeypatch):
    monkeypatch.setenv(bounds.MAX_MEMORY_ENV, str(100 << 20))    # under BASE alone
    with pytest.raises(OptionError, match="need about 0.5 GiB of memory"):
        plain_pipeline(str(tmp_path / "root"))
    assert not (tmp_path / "root" / "shards").exists()


def test_a_folder_source_is_held_to_the_caps_before_it_is_copied(folder, tmp_path, monkeypatch):
    """The folder was tarred whole into the root, then copied again, before any bound held: a
    300 MB file over a 10 MB ceiling wrote 301 MB, a 1.1 GiB one 2.2 GB (then the member cap)."""
    import pixelsim
    from pixelsim.storage.errors import ArchiveError

    root = tmp_path / "root"
    with open(folder / "video.bin", "wb") as f:
        f.truncate(300 << 20)   # sparse: no disk used by the source itself
    monkeypatch.setenv("PIXELSIM_MAX_DOWNLOAD_BYTES", str(10 << 20))
    with pytest.raises(ArchiveError, match=r"a folder source of more than 10485760 bytes .* \(at .*video.bin\)"):
        pixelsim.run(source=str(folder), root=str(root))
    monkeypatch.delenv("PIXELSIM_MAX_DOWNLOAD_BYTES")
    with open(folder / "video.bin", "wb") as f:
        f.truncate((1 << 30) + 1)
    with pytest.raises(ArchiveError, match=r"video.bin: 1073741825 bytes is over the 1073741824-byte member cap"):
        pixelsim.run(source=str(folder), root=str(root))
    written = sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())
    assert written < 1 << 20, written
