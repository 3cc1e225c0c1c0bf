"""The README's quickstart, its Python API session and its recipes are what the project does.

The recipes run on a root that holds two datasets and two parameter sets of one of them,
and must give the single-dataset figures there.
"""
from __future__ import annotations

import contextlib
import doctest
import io
import re

import pytest

from conftest import PROJECT, TINY, free_port

README = (PROJECT / "README.md").read_text()
# the published figures of mnist_sample, as each recipe prints them
SAMPLE_L1 = ("0.916832", "0.985409")
EXPECTED = {  # README python block -> what it must print on the mixed root
    0: ["6131", "6265", *SAMPLE_L1, "(12396, 28, 28)", "(10, 28, 28)"],
    1: ["('train', '3', 6131)", "('valid', '7', 1028)", "('3', 0.9168)", "('7', 0.9854)", "('3', 926, 84)",
        "('7', 15, 1013)", "('mnist_tiny', ", "('3', 6131, "],
    2: [*SAMPLE_L1, "1010", "1028"],
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    cmds = blocks("bash")[:2]
    assert cmds[0].strip().endswith("pixelsim run")
    assert "pytest" in cmds[1]
    assert cmds[1].strip() in (PROJECT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> str:
    """mnist_sample resized to 14x14, mnist_tiny, then mnist_sample as the quickstart runs it
    (from its bundled copy: the official URL is a closed loopback port), all in one root."""
    import pixelsim

    root = str(tmp_path_factory.mktemp("mixed") / "pixelsim-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIXELSIM_URL_MNIST_SAMPLE", f"http://127.0.0.1:{free_port()}/mnist_sample.tgz")
        small = pixelsim.run("mnist_sample", root=root, resize=(14, 14))
        tiny = pixelsim.run("mnist_tiny", source=str(TINY), root=root, shard_size=300)
        sample = pixelsim.run("mnist_sample", root=root)
    assert small.report["shape"] == [14, 14] and small.report["metrics"]["l1"]["per_class"] != \
        sample.report["metrics"]["l1"]["per_class"]
    assert tiny.report["metrics"]["l1"]["per_class"] == {"3": 0.8829, "7": 0.98}
    assert sample.report["metrics"]["l1"]["per_class"] == {"3": 0.9168, "7": 0.9854}
    return root


def test_the_python_api_session_runs_as_written(mixed_root, monkeypatch):
    monkeypatch.setenv("PIXELSIM_URL_MNIST_SAMPLE", f"http://127.0.0.1:{free_port()}/mnist_sample.tgz")
    (session,) = blocks("pycon")
    session = session.replace('root = "pixelsim-data"', f"root = {mixed_root!r}")
    test = doctest.DocTestParser().get_doctest(session, {}, "README pycon", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    runner.run(test, out=out.write)
    assert runner.failures == 0 and runner.tries >= 10, out.getvalue()


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_recipe_gives_the_single_dataset_figures_on_a_mixed_root(mixed_root, index):
    text = run_block(blocks("python")[index], mixed_root)
    missing = [want for want in EXPECTED[index] if want not in text]
    assert not missing, f"{missing} not in:\n{text}"
    assert "0.882857" not in text and "14, 14" not in text   # nothing of mnist_tiny's or the variant's


@pytest.mark.parametrize("index", range(len(blocks("python history"))))
def test_history_recipe_runs_on_a_mixed_root(mixed_root, index):
    text = run_block(blocks("python history")[index], mixed_root)
    assert "0.9511" in text or "0.9168" in text, text


def test_every_python_block_has_its_expectations():
    assert sorted(EXPECTED) == list(range(len(blocks("python"))))


def run_block(code: str, root: str) -> str:
    assert 'root = "pixelsim-data"' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace('root = "pixelsim-data"', f"root = {root!r}"), "README block", "exec"), {})
    return out.getvalue()
