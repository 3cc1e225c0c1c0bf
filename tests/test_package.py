"""What gets installed is one package, `pixelsim`, and the cache it keeps travels with the root."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import PROJECT, SAMPLE, SAMPLE_FIGURES, assert_figures, base_env


def test_the_wheel_installs_only_the_pixelsim_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(PROJECT)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("pixelsim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pixelsim", wheel.name.split("-py")[0] + ".dist-info"}
    for sub in ("flows", "tasks", "storage"):
        assert f"pixelsim/{sub}/__init__.py" in names
    assert "pixelsim/flows/data/mnist_sample.tgz" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pixelsim = pixelsim.flows.cli:main" in entry


def test_import_and_run_beside_a_users_own_tasks_storage_and_flows(cli, tmp_path):
    """A Prefect project often has its own tasks.py: pixelsim must not collide with it."""
    for name in ("tasks", "storage", "flows"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    code = ("import pixelsim, pixelsim.flows.pixel_similarity, pixelsim.tasks.convert, pixelsim.storage.root; "
            "print(pixelsim.PixelsimError.__module__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=base_env(tmp_path / "home"))
    assert p.returncode == 0 and p.stdout.strip() == "pixelsim.storage.errors", p.stderr
    r = cli("run", "--json")       # the CLI runs with its working directory in tmp_path
    assert r.code == 0, r.stderr
    assert_figures(r.report, SAMPLE_FIGURES)


def test_a_fresh_prefect_home_and_another_checkout_reuse_every_step_from_the_root(cli, tmp_path, monkeypatch):
    first = cli("run", "--json")
    assert first.code == 0, first.stderr
    assert first.states() == ["Completed"] * 9
    # another machine or container: nothing of the first run's Prefect state, only the root
    home = tmp_path / "other-home"
    again = cli("run", "--json", env={"PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "r")})
    assert again.code == 0, again.stderr
    assert again.states() == ["Cached"] * 9 and "reused cached results for 6 of 6 steps" in again.stderr
    assert again.report == first.report
    # a second checkout elsewhere (its bundled copy at another path, with another mtime), without Prefect
    import pixelsim
    from pixelsim.flows.datasets import Dataset

    copy = tmp_path / "clone" / "flows" / "data" / "mnist_sample.tgz"
    copy.parent.mkdir(parents=True)
    shutil.copy(SAMPLE, copy)
    monkeypatch.setattr(Dataset, "bundled_path", lambda self: str(copy))
    monkeypatch.setenv("PIXELSIM_URL_MNIST_SAMPLE", cli.env["PIXELSIM_URL_MNIST_SAMPLE"])
    plain = pixelsim.run("mnist_sample", root=str(cli.root))
    assert plain.cached == {s: True for s in plain.cached} and len(plain.cached) == 6
    assert plain.report == first.report
    # and the run left a record naming exactly what it used
    view = pixelsim.open(str(cli.root)).run(plain.run_id)
    assert {k: Path(cli.root, v).is_dir() for k, v in view.record["outputs"].items()} == {
        k: True for k in ("archive", "tree", "shards", "templates", "evaluation", "report")}
    assert view.report == first.report and view.options["shard_size"] == 5000


def test_torch_is_imported_only_where_templates_or_predictions_are_computed(cli, tmp_path):
    """torch (754 MB installed, 2 s to import here) stays off every path that does not compute."""
    assert cli("run", "--source", str(SAMPLE), "--json").code == 0
    root = str(cli.root)
    code = ("import sys\nfrom pixelsim.flows.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\nsys.exit(rc)")
    for args in (["--help"], ["datasets", "--root", root], ["show", "--root", root], ["runs", "--root", root],
                 ["diff", "--root", root], ["server", "status"], ["run", "--shard-size", "0", "--root", root],
                 ["run", "--source", str(SAMPLE), "--root", root, "--json"]):   # fully cached
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                           env=cli.env, cwd=tmp_path)
        assert p.stderr.strip().endswith("NO-TORCH"), (args, p.returncode, p.stderr[-2000:])


def test_a_root_mounted_elsewhere_reuses_every_step_and_points_into_itself(tmp_path):
    """The same root at another path (another machine's mount, a copied folder): every step is
    reused, and the cached report, the API and the run record point into the new place."""
    import json

    import pixelsim
    from conftest import TINY, TINY_FIGURES

    first = pixelsim.run(source=str(TINY), root=str(tmp_path / "here"), shard_size=300)
    shutil.move(tmp_path / "here", tmp_path / "there")
    moved = pixelsim.run(source=str(TINY), root=str(tmp_path / "there"), shard_size=300)
    assert_figures(moved.report, TINY_FIGURES)
    assert [s for s, hit in moved.cached.items() if not hit] == []   # download included: keyed by content
    assert all(v.startswith(f"{tmp_path}/there/") for v in moved.report["artifacts"].values()), moved.report
    assert (Path(moved.report["artifacts"]["report"]) / "report.html").is_file()
    latest = pixelsim.open(str(tmp_path / "there")).latest("mnist_tiny")
    assert latest.report["artifacts"] == moved.report["artifacts"]
    from pixelsim.flows.show import find_run
    for run in (first, moved):   # `pixelsim show <id>`, the earlier run's included
        found = find_run(str(tmp_path / "there"), run.run_id)
        assert found["report_dir"] == moved.report["artifacts"]["report"]
        assert found["report"]["artifacts"] == moved.report["artifacts"]
    assert find_run(str(tmp_path / "there"), moved.report["artifacts"]["report"])["report"] == moved.report
    stored = json.loads((Path(moved.report["artifacts"]["report"]) / "report.json").read_text())
    assert stored["artifacts"]["report"] == first.report["artifacts"]["report"].removeprefix(f"{tmp_path}/here/")
