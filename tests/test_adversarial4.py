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
