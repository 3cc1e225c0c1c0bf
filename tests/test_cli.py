"""End to end: the `pixelsim` CLI in a subprocess, archives served from 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import PIXELSIM, SAMPLE, SAMPLE_COUNTS, SAMPLE_FIGURES, TINY, TINY_FIGURES, assert_figures, base_env

ALL = ["download", "untar", "convert", "templates", "evaluate", "report"]


def test_sample_over_http_gives_published_figures_then_caches_then_rebuilds(cli, serve):
    url = serve({"mnist_sample.tgz": SAMPLE}) + "/mnist_sample.tgz"
    first = cli("run", "--source", url, "--json")
    assert first.code == 0, first.stderr
    rep = first.report
    assert_figures(rep, SAMPLE_FIGURES)
    assert rep["counts"] == SAMPLE_COUNTS
    assert rep["classes"] == ["3", "7"]
    assert rep["metrics"]["l1"]["overall"] == 0.9514
    assert rep["metrics"]["l1"]["confusion"] == [[926, 84], [15, 1013]]
    assert rep["source"] == {"url": url, "sha256": "feba62848df904f60b47afc0ae1cf4deaa8e0d484c5ad18ae9d0e0e8a2cb1706",
                             "bytes": 3396206}
    # download, untar, 3 train + 1 valid convert shards, templates, 1 evaluate shard, report
    assert first.states() == ["Completed"] * 9
    # the report files say the same as stdout
    report_dir = Path(rep["artifacts"]["report"])
    stored = json.loads((report_dir / "report.json").read_text())   # its artifacts root-relative: it can move
    assert stored == {**rep, "artifacts": {k: os.path.relpath(v, cli.root) for k, v in rep["artifacts"].items()}}
    assert "0.9168" in (report_dir / "report.md").read_text()
    assert (report_dir / "confusion-l1.csv").read_text().splitlines()[1:] == ["3,926,84", "7,15,1013"]
    preds = pq.read_table(Path(rep["artifacts"]["predictions"]).parent).to_pandas()
    l1 = preds[preds.metric == "l1"]
    assert len(l1) == 2038 and round(l1[l1.label == "3"].correct.mean(), 4) == 0.9168

    second = cli("run", "--source", url, "--json")
    assert second.code == 0, second.stderr
    assert second.report == rep
    assert second.states() == ["Cached"] * 9
    assert "reused cached results for 6 of 6 steps" in second.stderr

    shard = sorted(Path(rep["artifacts"]["shards"]).glob("train-*.parquet"))[1]
    shard.unlink()
    third = cli("run", "--source", url, "--json")
    assert third.code == 0, third.stderr
    assert third.report == rep
    assert "convert-train-00001: cached result no longer valid" in third.stderr
    assert shard.exists()
    # only the lost shard was rebuilt
    assert third.states().count("Completed") == 1


def test_human_output_and_refresh(cli, serve):
    url = serve({"mnist_tiny.tgz": TINY}) + "/mnist_tiny.tgz"
    first = cli("run", "--source", url, "--metric", "rmse")
    assert first.code == 0, first.stderr
    assert "rmse accuracy on 3: 0.9429" in first.stdout
    assert "reused cached results for 0 of 6 steps" in first.stdout
    assert "mnist_tiny: 2 classes, 700 train / 700 valid images" in first.stdout
    assert "note: file labels.csv beside the split folders ignored" in first.stdout   # said, not only in the report
    again = cli("run", "--source", url, "--metric", "rmse", "--refresh", "--json")
    assert again.code == 0, again.stderr
    assert again.states() == ["Completed"] * 7   # 2 convert shards, 1 evaluate shard
    assert again.report["dataset"] == "mnist_tiny"
    assert_figures(again.report, TINY_FIGURES)
    # another parameter is another result: a smaller shard size re-converts, same figures
    other = cli("run", "--source", url, "--shard-size", "100", "--json")
    assert other.states()[:3] == ["Cached", "Cached", "Completed"]
    assert len(list(Path(other.report["artifacts"]["shards"]).glob("train-*.parquet"))) == 7
    assert_figures(other.report, TINY_FIGURES)


def test_offline_default_uses_bundled_copy_without_a_server(tmp_path):
    """A newcomer's first run: no Prefect server, official URL unreachable."""
    env = base_env(tmp_path / "home")
    p = subprocess.run([PIXELSIM, "run", "--json", "--root", str(tmp_path / "root")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)["report"]
    assert_figures(rep, SAMPLE_FIGURES)
    assert rep["counts"] == SAMPLE_COUNTS
    assert rep["source"]["bundled"] is True
    assert rep["source"]["url"].endswith("mnist_sample.tgz") and os.path.exists(rep["source"]["url"])
    assert "unreachable; used the bundled copy" in rep["source"]["note"]
    assert "falling back to the bundled copy" in p.stderr


def test_explicit_source_never_falls_back(cli):
    r = cli("run", "--source", f"{base_env(Path('/tmp'))['PIXELSIM_URL_MNIST_SAMPLE']}", "--json")
    assert r.code == 1
    assert r.stdout == ""
    assert "127.0.0.1" in r.stderr and "bundled" not in r.stderr


def test_checksum_mismatch_names_url_and_publishes_nothing(cli, serve):
    url = serve({"mnist_tiny.tgz": TINY}) + "/mnist_tiny.tgz"
    r = cli("run", "--source", url, "--sha256", "0" * 64)
    assert r.code == 1
    assert url in r.stderr and "sha256" in r.stderr
    archives = cli.root / "archives"
    assert not archives.exists() or [p for p in archives.rglob("*") if p.is_file()] == []


def test_a_pin_as_pasted_with_spaces_and_capitals_is_the_same_pin(cli, serve):
    import hashlib
    url = serve({"mnist_tiny.tgz": TINY}) + "/mnist_tiny.tgz"
    r = cli("run", "--source", url, "--sha256", f"  {hashlib.sha256(TINY.read_bytes()).hexdigest().upper()} ",
            "--json")
    assert r.code == 0, r.stderr
    assert_figures(r.report, TINY_FIGURES)


def _tgz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tiny_members(limit: int = 20) -> dict[str, bytes]:
    """A few real PNGs per class folder, taken from the tiny archive."""
    out: dict[str, bytes] = {}
    with tarfile.open(TINY) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] in ("train", "valid"):
                key = "/".join(parts[1:3])
                if sum(1 for k in out if k.startswith(key)) < limit:
                    out[m.name] = tf.extractfile(m).read()
    return out


def test_member_escaping_destination_is_refused(cli, serve, tmp_path):
    members = _tiny_members()
    members["../escaped.png"] = next(iter(members.values()))
    url = serve({"evil.tgz": _tgz(members)}) + "/evil.tgz"
    r = cli("run", "--source", url)
    assert r.code == 1
    assert "../escaped.png" in r.stderr
    assert not (cli.root / "escaped.png").exists() and not (cli.root.parent / "escaped.png").exists()
    assert not (cli.root / "extracted").exists() or list((cli.root / "extracted").iterdir()) == []


def test_non_png_in_class_folder_is_named_and_nothing_published(cli, serve):
    members = _tiny_members()
    members["mnist_tiny/train/7/notes.png"] = b"these are not pixels\n"
    url = serve({"bad.tgz": _tgz(members)}) + "/bad.tgz"
    r = cli("run", "--source", url)
    assert r.code == 1
    assert "mnist_tiny/train/7/notes.png" in r.stderr
    # good shards may wait in a hidden _parts/ folder, but nothing is published
    assert list(cli.root.glob("shards/*/*/*.parquet")) == []
    assert list(cli.root.glob("shards/*/*/_manifest.json")) == []


def test_a_missing_gpu_fails_before_any_work(cli):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = cli("run", "--device", "cuda", "--source", str(cli.root.parent / "never-read.tgz"))
    assert r.code == 1
    assert "--device cuda: torch sees no CUDA GPU" in r.stderr and "use --device cpu" in r.stderr
    assert not cli.root.exists() or not any(cli.root.rglob("*.parquet"))  # nothing downloaded or converted
