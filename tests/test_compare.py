"""Run-to-run comparison: `pixelsim runs` lists the history, `pixelsim diff` says what changed
(accuracy per class, the source archive member by member, the parameters)."""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile

import pytest

import pixelsim
from conftest import PIXELSIM, TINY, TINY_FIGURES, base_env


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Three runs of one folder source (no Prefect): as it is, then with one training 3 replaced
    by a 7, one file added and one removed, then with another shard size."""
    tmp = tmp_path_factory.mktemp("compare")
    with tarfile.open(TINY) as tf:
        tf.extractall(tmp / "src", filter="data")
    folder, root = tmp / "src" / "mnist_tiny", str(tmp / "root")
    first = pixelsim.run(source=str(folder), dataset="tiny", root=root)
    threes, sevens = sorted((folder / "train" / "3").glob("*.png")), sorted((folder / "valid" / "7").glob("*.png"))
    shutil.copyfile(sevens[0], threes[0])                       # changed
    shutil.copyfile(sevens[1], folder / "train" / "7" / "extra.png")   # added
    threes[1].unlink()                                          # removed
    second = pixelsim.run(source=str(folder), dataset="tiny", root=root)
    third = pixelsim.run(source=str(folder), dataset="tiny", root=root, shard_size=100)
    names = {"changed": f"mnist_tiny/train/3/{threes[0].name}", "added": "mnist_tiny/train/7/extra.png",
             "removed": f"mnist_tiny/train/3/{threes[1].name}"}
    return {"root": root, "runs": [first, second, third], "names": names, "home": tmp / "home"}


def pixelsim_cli(history, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIXELSIM, *args, "--root", history["root"]], capture_output=True, text=True, timeout=60,
                          env=base_env(history["home"]))


def test_runs_lists_the_history_newest_first_with_the_change(history):
    p = pixelsim_cli(history, "runs", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    first, second, third = history["runs"]
    assert [r["run_id"] for r in rows] == [third.run_id, second.run_id, first.run_id]
    assert rows[-1]["change"] is None and rows[-1]["balanced"] == first.report["metrics"]["l1"]["balanced"]
    assert rows[-2]["change"] == round(second.report["metrics"]["l1"]["balanced"]
                                       - first.report["metrics"]["l1"]["balanced"], 4)
    assert rows[0]["cached_steps"] == 2 and rows[-1]["cached_steps"] == 0   # new shards: download, untar reused
    text = pixelsim_cli(history, "runs", "--last", "2").stdout.splitlines()
    assert len(text) == 3 and text[1].split()[2] == third.run_id[:8]
    assert "no runs recorded" in pixelsim_cli(history, "runs", "--dataset", "other").stdout


def test_diff_names_the_members_added_removed_and_changed(history):
    first, second, _ = history["runs"]
    p = pixelsim_cli(history, "diff", first.run_id[:8], second.run_id[:8], "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    n = history["names"]
    assert d["source"]["same"] is False
    assert (d["source"]["added"], d["source"]["removed"], d["source"]["changed"]) == \
        ([n["added"]], [n["removed"]], [n["changed"]])
    assert d["parameters"] == {}
    l1 = {r["row"]: r for r in d["accuracy"]["l1"]}
    assert l1["3"]["a"] == TINY_FIGURES["l1"]["3"] == first.report["metrics"]["l1"]["per_class"]["3"]
    assert l1["3"]["b"] == second.report["metrics"]["l1"]["per_class"]["3"]
    assert l1["balanced"]["change"] == round(l1["balanced"]["b"] - l1["balanced"]["a"], 4)
    text = pixelsim_cli(history, "diff", first.run_id[:8], second.run_id[:8]).stdout
    assert f"1 member(s) added: {n['added']}" in text and f"1 member(s) changed: {n['changed']}" in text


def test_diff_defaults_to_the_latest_run_against_the_one_before_and_names_parameters(history):
    _, second, third = history["runs"]
    d = json.loads(pixelsim_cli(history, "diff", "--json").stdout)
    assert (d["a"]["run_id"], d["b"]["run_id"]) == (second.run_id, third.run_id)
    assert d["parameters"] == {"shard_size": {"a": 5000, "b": 100}}
    assert d["source"]["same"] is True and "source archive: unchanged" in pixelsim_cli(history, "diff").stdout
    one = json.loads(pixelsim_cli(history, "diff", third.run_id[:8], "--json").stdout)
    assert one["a"]["run_id"] == second.run_id


def test_diff_of_a_first_run_or_an_unknown_one_is_one_line(history):
    first = history["runs"][0]
    for args, line in ((["diff", first.run_id[:8]], "is the first run of tiny"),
                       (["diff", "nosuchrun"], "no run 'nosuchrun'"),
                       (["diff", "a", "b", "c"], "diff takes at most two runs")):
        p = pixelsim_cli(history, *args)
        assert p.returncode in (1, 2) and p.stderr.count("\n") == 1 and line in p.stderr, p.stderr


def test_an_unreadable_history_file_is_skipped_with_a_warning_not_fatal(history, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(history["root"], root)
    (root / "history" / "20990101T000000.000000Z-garbage.parquet").write_bytes(b"PAR1 not parquet")
    copy = {**history, "root": str(root)}
    for args in (["runs", "--json"], ["show", "--json"], ["diff", "--json"]):
        p = pixelsim_cli(copy, *args)
        assert p.returncode == 0, (args, p.stderr)
        assert "garbage.parquet skipped: unreadable" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert len(json.loads(pixelsim_cli(copy, "runs", "--json").stdout)) == 3
