"""Run-to-run comparison: `pixelsim runs` lists the history, `pixelsim diff` says what changed
(accuracy per class, the source archive member by member, the parameters)."""
from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_history_file_that_is_a_fifo_an_endless_device_or_huge_is_skipped_without_hanging(history, tmp_path, kind):
    """Read whole, a FIFO in history/ blocked every command for ever and a link to /dev/zero
    filled memory; a run's rows are a few KB, so more than 64 MiB is damage too."""
    root = tmp_path / "copy"
    shutil.copytree(history["root"], root)
    bad = root / "history" / "20990101T000000.000000Z-bad.parquet"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "dev-zero":
        bad.symlink_to("/dev/zero")
    else:
        with open(bad, "wb") as f:
            f.truncate(65 << 20)   # sparse: no disk used
    copy = {**history, "root": str(root)}
    for args in (["runs", "--json"], ["show", "--json"], ["diff", "--json"]):
        p = pixelsim_cli(copy, *args)   # its own timeout: 60 s
        assert p.returncode == 0, (args, p.stderr)
        assert "bad.parquet skipped: unreadable" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert len(json.loads(pixelsim_cli(copy, "runs", "--json").stdout)) == 3


def _copy(history, tmp_path) -> dict:
    root = tmp_path / "copy"
    shutil.copytree(history["root"], root)
    return {**history, "root": str(root)}


def test_an_altered_history_file_is_never_shown_as_figures(history, tmp_path):
    """Each history file is sealed (the digest of its rows in its schema metadata): a changed
    figure, or a file of another shape that passes for one, is skipped with the warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    copy = _copy(history, tmp_path)
    files = sorted((tmp_path / "copy" / "history").glob("*.parquet"))
    newest = pq.read_table(files[-1])
    balanced = pa.array([0.1234] * newest.num_rows)   # the seal (schema metadata) kept, a figure changed
    pq.write_table(newest.set_column(newest.schema.get_field_index("balanced"), "balanced", balanced), files[-1])
    # foreign files: the columns a reader looks for first, or balanced written as text
    pq.write_table(pa.table({"run_id": ["x"], "time": pa.array([0], pa.timestamp("us", tz="UTC")),
                             "dataset": ["tiny"], "metric": ["l1"]}), files[0].with_name("20990101T000000.000000Z-a.parquet"))
    pq.write_table(newest.set_column(newest.schema.get_field_index("balanced"), "balanced",
                                     pa.array(["0.9"] * newest.num_rows)), files[0].with_name("20990102T000000.000000Z-b.parquet"))
    for args in (["runs", "--json"], ["diff", "--json"]):
        p = pixelsim_cli(copy, *args)
        assert p.returncode == 0, (args, p.stderr)
        assert p.stderr.count("skipped") == 3 and "0.1234" not in p.stdout, p.stderr
    rows = json.loads(pixelsim_cli(copy, "runs", "--json").stdout)
    assert [r["run_id"] for r in rows] == [r.run_id for r in history["runs"][1::-1]]
    assert rows[0]["balanced"] == history["runs"][1].report["metrics"]["l1"]["balanced"]


def test_a_flipped_byte_anywhere_in_a_history_file_gives_the_same_rows_or_a_skip(history, tmp_path):
    from pixelsim.storage.history import read_history
    from pixelsim.storage.root import Root
    copy = _copy(history, tmp_path)
    path = sorted((tmp_path / "copy" / "history").glob("*.parquet"))[-1]
    good, want = path.read_bytes(), read_history(Root(copy["root"])).to_pylist()
    without = [r for r in want if r["run_id"] != history["runs"][2].run_id]   # the file skipped
    assert len(without) == len(want) - 2
    kept = tried = 0
    for at in range(0, len(good), 3):
        path.write_bytes(good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1:])
        got = read_history(Root(copy["root"])).to_pylist()
        assert got in (want, without), at
        kept, tried = kept + (got == want), tried + 1
    assert 0 < kept < tried   # a flip in bytes no reader uses (statistics, padding) changes nothing


def test_a_run_record_that_is_not_pixelsims_is_treated_as_missing(history, tmp_path):
    """`[]`, a null source, an altered record: diff falls back on the history rows, the API says so in one line."""
    copy = _copy(history, tmp_path)
    third = history["runs"][2]
    record = tmp_path / "copy" / "runs" / "tiny" / f"{third.run_id}.json"
    good = json.loads(record.read_text())
    for body in ([], {**good, "source": None}, {**good, "outputs": "x"}, {**good, "seconds": 1.0}):
        record.write_text(json.dumps(body))
        p = pixelsim_cli(copy, "diff", "--json")
        assert p.returncode == 0 and json.loads(p.stdout)["b"]["run_id"] == third.run_id, (body, p.stderr)
        with pytest.raises(pixelsim.PixelsimError, match="not a run record"):
            pixelsim.open(copy["root"]).run(third.run_id)
