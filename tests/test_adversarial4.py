"""Fourth adversarial pass: each test reproduces a fault that once gave a wrong figure, a
traceback or an error where a recomputation was due (see docs/RELIABILITY.md)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pixelsim
from conftest import TINY, TINY_FIGURES, assert_figures
from pixelsim.storage.errors import IntegrityError, LayoutError, OptionError, PixelsimError


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """One plain run of mnist_tiny; tests take a copy (`fresh`) to damage."""
    root = tmp_path_factory.mktemp("adv4") / "root"
    pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    return root


@pytest.fixture
def fresh(tiny_root, tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root, symlinks=True)
    return root


def only(root: Path, pattern: str) -> Path:
    (found,) = root.glob(pattern)
    return found


# -- 1. the validation split must never be the training split ---------------------------------

@pytest.mark.parametrize("options, message", [
    # mnist_tiny has train/, valid/ and an unlabeled test/: with valid/ as the training split,
    # nothing labeled is left to evaluate on (before: valid/ was both, balanced 0.9386, exit 0)
    ({"train_split": "valid"}, "no labeled validation split folder (valid/validation/test/testing) "
                               "beside mnist_tiny/valid/"),
    ({"valid_split": "train"}, "--valid-split train: mnist_tiny/train/ is the training split"),
])
def test_the_validation_split_is_never_the_training_split(tmp_path, options, message):
    with pytest.raises(LayoutError) as e:
        pixelsim.run(source=str(TINY), root=str(tmp_path / "root"), shard_size=300, **options)
    assert message in str(e.value)
    assert not list((tmp_path / "root").glob("shards/*/*/_manifest.json"))   # nothing converted


def test_the_same_folder_for_both_splits_is_an_option_error_before_any_work(tmp_path):
    with pytest.raises(OptionError, match=r"--valid-split train: the same folder as --train-split"):
        pixelsim.run(source=str(TINY), root=str(tmp_path / "root"), train_split="train", valid_split="train")
    assert not (tmp_path / "root").exists()


def test_a_valid_split_named_like_the_training_one_is_caught_on_a_cached_archive(fresh):
    """The check before Prefect starts (flows.checks) says it too, as an option error."""
    from pixelsim.flows.checks import check_request
    from pixelsim.tasks.contracts import Request

    with pytest.raises(OptionError, match=r"--valid-split train: mnist_tiny/train/ is the training split"):
        check_request(Request.build(source=str(TINY), root=str(fresh), valid_split="train"))


# -- 2. a damaged cache is recomputed, also when the options are checked against it -----------

@pytest.mark.parametrize("folder, step", [("archives", "download"), ("extracted", "untar")])
def test_a_damaged_manifest_under_the_name_check_is_recomputed_not_an_error(fresh, folder, step):
    """--classes (or a split name) is checked against the cached archive before any work; a
    damaged manifest there used to end the run (IntegrityError) instead of being rebuilt."""
    manifest = only(fresh, f"{folder}/*/_manifest.json")
    original = manifest.read_text()
    body = json.loads(original)
    body["files"][0]["bytes"] += 1
    manifest.write_text(json.dumps(body))
    out = pixelsim.run(source=str(TINY), root=str(fresh), shard_size=300, classes=["3", "7"])
    assert_figures(out.report, TINY_FIGURES)
    assert not out.cached[step]
    assert manifest.read_text() == original   # rebuilt, the same bytes as before the damage


# -- 3. the Python API reads only what matches its manifest -----------------------------------

def rewrite_parquet(path: Path, change) -> None:
    """Replace a Parquet file by a valid one whose table is `change(table)`, metadata kept."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


def test_the_api_never_returns_altered_templates_or_predictions(fresh):
    import numpy as np
    import pyarrow as pa

    view = pixelsim.open(str(fresh)).latest()
    want = view.templates()
    assert sorted(want) == ["3", "7"] and want["3"].shape == (28, 28)
    predictions = view.predictions()
    assert len(predictions) == 1400 and int(predictions["correct"].sum()) == 309 + 343 + 330 + 337

    # a valid Parquet file with other figures in it (before: returned as the run's templates)
    tmpl = fresh / view.folder("templates") / "templates.parquet"
    saved = tmpl.read_bytes()
    zeros = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * 784, np.float32)), 784)
    rewrite_parquet(tmpl, lambda t: t.set_column(t.schema.get_field_index("template"), "template", zeros))
    with pytest.raises(IntegrityError, match=r"templates\.parquet: does not match its manifest.*rebuilds it"):
        pixelsim.open(str(fresh)).latest().templates()
    tmpl.write_bytes(saved)
    assert np.array_equal(pixelsim.open(str(fresh)).latest().templates()["7"], want["7"])

    # every prediction marked correct (before: returned as they were)
    first = sorted((fresh / view.folder("evaluation")).glob("predictions-*.parquet"))[0]
    rewrite_parquet(first, lambda t: t.set_column(t.schema.get_field_index("correct"), "correct",
                                                  pa.array([True] * len(t))))
    with pytest.raises(IntegrityError, match=r"predictions-valid-00000-of-00003\.parquet: does not match its manifest"):
        pixelsim.open(str(fresh)).latest().predictions()
    first.unlink()
    with pytest.raises(IntegrityError, match=r"predictions-valid-00000-of-00003\.parquet: listed in the manifest but missing"):
        pixelsim.open(str(fresh)).latest().predictions()
    with pytest.raises(PixelsimError, match=r"step 'model': use one of archive, tree, shards, templates, evaluation, report"):
        view.folder("model")


def test_the_api_refuses_a_step_folder_holding_another_runs_output(fresh):
    """A shard folder replaced by another run's (3 channels instead of 1): load_split used to
    return that run's images under this run's name."""
    first = pixelsim.open(str(fresh)).latest()
    other = pixelsim.run(source=str(TINY), root=str(fresh), shard_size=300, channels=3)
    mine = fresh / first.folder("shards")
    shutil.rmtree(mine)
    shutil.copytree(fresh / other.outputs.shards.dir, mine)
    with pytest.raises(IntegrityError, match=r"holds the output of shards/mnist_tiny/\w+, not its own"):
        first.load_split("train")
    images, labels, classes = pixelsim.open(str(fresh)).latest().load_split("train")
    assert images.shape == (700, 28, 28, 3) and classes == ["3", "7"] and labels.sum() == 350


@pytest.mark.parametrize("damage", ["truncated", "missing", "folder", "binary"])
def test_a_damaged_run_record_is_one_integrity_error_naming_it(fresh, damage):
    record = only(fresh, "runs/mnist_tiny/*.json")
    if damage == "truncated":
        record.write_text(record.read_text()[:40])
    elif damage == "binary":
        record.write_bytes(b"\xff\xfe\x00\x01")
    else:
        record.unlink()
        if damage == "folder":
            record.mkdir()
    store = pixelsim.open(str(fresh))
    for read in (store.latest, lambda: store.run(record.stem[:8])):
        with pytest.raises(IntegrityError) as e:
            read()
        assert str(e.value).startswith(f"{record}: ")
        assert ("the run record is missing" if damage == "missing" else "not a run record of this pixelsim") in str(e.value)


# -- 4. `pixelsim show` of a report folder that was never published --------------------------

def test_show_of_a_report_folder_without_its_manifest_is_one_line(fresh, capsys):
    """A report folder holding report.json but no manifest (a run killed while publishing, or
    a copy of report.json alone), that no run of the history names: before, a TypeError."""
    from pixelsim.flows.cli import main

    folder = only(fresh, "reports/mnist_tiny/*")
    run_id = only(fresh, "runs/mnist_tiny/*.json").stem
    # `fresh` is a copy of the root the run wrote: its history names the report folder where it was
    # written, and root-relative; the folder is matched to its run here too (before, only there)
    assert main(["show", str(folder), "--root", str(fresh)]) == 0
    out = capsys.readouterr().out
    assert f"run {run_id}" in out and "steps (0 of 6 cached):" in out and "0.8829" in out
    elsewhere = fresh.parent / "copy"
    elsewhere.mkdir()
    shutil.copy(folder / "report.json", elsewhere / "report.json")
    (folder / "_manifest.json").unlink()
    for target in (elsewhere, elsewhere / "report.json"):
        assert main(["show", str(target), "--root", str(fresh)]) == 1
        err = capsys.readouterr().err
        assert err == (f"pixelsim: error: {target}: a report folder without its manifest (never published, or its run "
                       "did not finish), and no run in the history names it; `pixelsim run` with the same options "
                       "rebuilds it\n")
    # the run's own folder, named by the history: its figures from the history, exit 0
    assert main(["show", str(folder), "--root", str(fresh)]) == 0
    out = capsys.readouterr().out
    assert "report folder" in out and "is gone; figures from the history" in out and "0.8829" in out


# -- 5. more classes than a shard can label ----------------------------------------------------

def tiny_png(value: int = 7, size: tuple[int, int] = (4, 4)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_more_classes_than_a_shard_can_label_is_one_line_before_any_decoding(tmp_path):
    """label_index is int16: 32,768 classes used to decode every image, then fail in pyarrow
    (ArrowInvalid: Integer value 32768 not in range), a traceback after minutes of work."""
    import io
    import tarfile

    png = tiny_png()
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tf:
        for name in [f"many/train/c{i}/a.png" for i in range(2**15)] + ["many/valid/c0/a.png", "many/valid/c1/a.png"]:
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tf.addfile(info, io.BytesIO(png))
    with pytest.raises(LayoutError) as e:
        pixelsim.run(source=str(archive), root=str(tmp_path / "root"))
    assert str(e.value) == ("many/train/ holds 32,768 class folders with images, over the 32,767 a shard can label: "
                            "pick some with --classes")
    assert not list((tmp_path / "root").glob("shards/*/*/*.parquet"))


# -- 6. a dead run's lock that records this very process's pid ------------------------------

def test_a_lock_left_by_an_earlier_process_with_this_pid_is_broken_at_once(tmp_path):
    """A container restarted runs pixelsim under the same pid (often 1) and hostname: a lock the
    killed run left records our own pid, and was held (pid == ours is never "dead") until its
    heartbeat went stale, two minutes later, though its identity says it is another process."""
    import os
    import time

    from pixelsim.storage.locks import HOST, ExpiringLockManager, identity

    m = ExpiringLockManager(tmp_path)
    mine = identity(os.getpid())
    assert mine is not None
    lock = {"holder": "killed-run", "expiration": time.time() + 3600, "host": HOST, "pid": os.getpid()}
    (tmp_path / "k.lock").write_text(json.dumps({**lock, "identity": mine.rsplit(":", 1)[0] + ":1"}))
    started = time.monotonic()
    assert m.acquire_lock("k", "me", acquire_timeout=5)
    assert time.monotonic() - started < 1
    assert json.loads((tmp_path / "k.lock").read_text())["holder"] == "me"
    m.release_lock("k", "me")
    # a lock of another holder in this very process (another thread's step) still holds
    (tmp_path / "k.lock").write_text(json.dumps({**lock, "identity": mine}))
    assert m.is_locked("k") and not m.acquire_lock("k", "me", acquire_timeout=0.3)
