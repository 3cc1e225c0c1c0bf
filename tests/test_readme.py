"""The README's quickstart and recipes are what the project actually does."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from conftest import PROJECT, TINY
from storage.layout import find_layout
from storage.root import Root
from tasks.convert import convert_tree, tree_entries
from tasks.download import download_archive
from tasks.evaluate import evaluate_templates
from tasks.templates import compute_templates
from tasks.untar import untar_archive

README = (PROJECT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    cmds = blocks("bash")[:2]
    assert cmds[0].strip().endswith("pixelsim run")
    assert "pytest" in cmds[1]
    assert cmds[1].strip() in (PROJECT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("root") / "pixelsim-data")
    tree = untar_archive(download_archive(str(TINY), root), root)
    lay = find_layout(list(tree_entries(Root(root), tree)))
    shards = convert_tree(tree, lay.to_dict(), "mnist_sample", root)
    evaluate_templates(shards, compute_templates(shards, root), root)
    return root


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_recipe_runs(root, index):
    code = blocks("python")[index].replace('root = "pixelsim-data"', f"root = {root!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README python block {index}", "exec"), {})
    text = out.getvalue()
    assert "350" in text or "0.88" in text, text   # real figures of the tiny archive come out
