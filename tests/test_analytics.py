"""Run history, `pixelsim show` and the README's analytics recipes, on a root the CLI made."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import PROJECT, TINY, TINY_FIGURES, Cli, base_env
from pixelsim.storage.history import HISTORY, append_run, history_rows, read_history
from pixelsim.storage.root import Root

README = (PROJECT / "README.md").read_text()
STEPS = ["download", "untar", "convert", "templates", "evaluate", "report"]


def blocks(info: str) -> list[str]:
    return re.findall(rf"```{info}\n(.*?)```", README, re.S)


RECIPES = [("python", i) for i in range(len(blocks("python")))] + \
          [("python history", i) for i in range(len(blocks("python history")))]


@pytest.fixture(scope="module")
def runs(prefect_server, tmp_path_factory):
    """Two CLI runs on one root (as conftest's `cli` fixture sets it up, shared by this module):
    the first computes every step, the second reuses them all."""
    tmp = tmp_path_factory.mktemp("analytics")
    env = base_env(tmp / "home")
    env.update(PREFECT_API_URL=prefect_server, PREFECT_LOCAL_STORAGE_PATH=str(tmp / "results"))
    cli = Cli(env, tmp / "root")
    # filed under the name the README's recipes use
    first = cli("run", "--source", str(TINY), "--dataset", "mnist_sample", "--json")
    assert first.code == 0, first.stderr
    second = cli("run", "--source", str(TINY), "--dataset", "mnist_sample")
    assert second.code == 0, second.stderr
    return cli, first, second


def test_every_run_appends_its_rows(runs):
    cli, first, second = runs
    table = read_history(Root(str(cli.root)))
    assert table.num_rows == 4 and len(list((cli.root / HISTORY).glob("*.parquet"))) == 2
    rows = table.to_pylist()
    ids = list(dict.fromkeys(r["run_id"] for r in rows))
    assert f"run: {ids[1]} " in second.stdout          # the human output names the run
    assert rows[0]["time"] < rows[2]["time"] <= datetime.now(timezone.utc)
    rep = first.report
    for row in rows:
        want = TINY_FIGURES[row["metric"]]
        assert row["dataset"] == "mnist_sample" and row["source_url"] == str(TINY)
        assert row["source_sha256"] == rep["source"]["sha256"]
        assert row["per_class"] == [{"class": "3", "accuracy": want["3"]}, {"class": "7", "accuracy": want["7"]}]
        assert row["balanced"] == want["balanced"] and row["overall"] == rep["metrics"][row["metric"]]["overall"]
        assert row["headline"] == (row["metric"] == "l1")
        assert row["report"] == rep["artifacts"]["report"]
        assert [s["step"] for s in row["steps"]] == STEPS
        assert all(s["seconds"] >= 0 for s in row["steps"]) and row["total_seconds"] >= sum(
            s["seconds"] for s in row["steps"]) - 0.01
    # the first run computed every step, the second reused them all
    assert [s["cached"] for s in rows[0]["steps"]] == [False] * 6
    assert [s["cached"] for s in rows[2]["steps"]] == [True] * 6
    assert "reused cached results for 6 of 6 steps" in second.stdout


def test_show_latest_by_prefix_and_by_folder(runs):
    cli, first, _ = runs
    root = str(cli.root)
    ids = list(dict.fromkeys(read_history(Root(root)).column("run_id").to_pylist()))
    latest = cli("show", "--root", root)
    assert latest.code == 0, latest.stderr
    out = latest.stdout
    assert f"run {ids[1]}" in out and "mnist_sample: 2 classes, 700 train / 700 valid images" in out
    assert re.search(r"3\s+0\.8829\s+0\.9429", out) and re.search(r"balanced\s+0\.9314\s+0\.9529", out)
    assert "steps (6 of 6 cached)" in out
    assert f"report: {first.report['artifacts']['report']}/report.html" in out

    older = cli("show", ids[0][:8], "--root", root, "--json")
    assert older.code == 0, older.stderr
    data = json.loads(older.stdout)
    assert data["run_id"] == ids[0] and data["report"] == first.report
    assert [s["cached"] for s in data["steps"]] == [False] * 6
    assert data["metrics"]["rmse"]["per_class"] == {"3": 0.9429, "7": 0.9629}

    folder = cli("show", first.report["artifacts"]["report"], "--root", root)
    assert folder.code == 0 and f"run {ids[1]}" in folder.stdout   # the latest run that wrote that report

    missing = cli("show", "ffffffff", "--root", root)
    assert missing.code == 1 and "no run 'ffffffff'" in missing.stderr and missing.stdout == ""
    empty = cli("show", "--root", str(cli.root.parent / "nothing-here"))
    assert empty.code == 1 and "no runs recorded" in empty.stderr


def test_show_needs_no_prefect(runs, tmp_path):
    """No server, no PREFECT_API_URL, and Prefect is never even imported."""
    cli, _, _ = runs
    code = ("import sys; from pixelsim.flows.cli import main; rc = main(['show', '--root', sys.argv[1]]); "
            "assert 'prefect' not in sys.modules, 'prefect imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(cli.root)], env=base_env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert p.returncode == 0, p.stderr
    assert "0.9314" in p.stdout


@pytest.mark.parametrize("info,index", RECIPES, ids=[f"{i.replace(' ', '-')}-{n}" for i, n in RECIPES])
def test_readme_recipe_on_a_cli_root(runs, info, index):
    cli, _, _ = runs
    code = blocks(info)[index]
    assert 'root = "pixelsim-data"' in code
    code = code.replace('root = "pixelsim-data"', f"root = {str(cli.root)!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README {info} block {index}", "exec"), {})
    text = out.getvalue()
    assert "350" in text or "0.88" in text, text
    if info == "python history":
        assert "0.8829" in text or "0.9314" in text, text


def test_history_recipes_are_documented():
    assert len(blocks("python history")) == 3
    text = " ".join(blocks("python history"))
    assert "pd.read_parquet" in text and "duckdb.sql" in text and "pl.read_parquet" in text


def _report(n: int) -> dict:
    return {"dataset": "d", "source": {"url": "u", "sha256": "s"}, "classes": ["a", "b"], "metric": "l1",
            "metrics": {"l1": {"per_class": {"a": 0.5, "b": None}, "balanced": 0.5, "overall": n / 100},
                        "rmse": {"per_class": {"a": 1.0, "b": 0.0}, "balanced": 0.5, "overall": 0.5}},
            "artifacts": {"report": f"/r/{n}"}}


def test_concurrent_appends_lose_nothing_and_readers_skip_unfinished_files(tmp_path):
    root = Root(str(tmp_path / "root"))
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    steps = [{"step": s, "seconds": 0.5, "cached": False} for s in STEPS]
    threads = [threading.Thread(target=append_run, args=(root, history_rows(
        f"run-{i:02d}", start + timedelta(seconds=i % 3), _report(i), steps, 3.0))) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # a run killed mid-write leaves only a `_tmp-` file, which no reader takes for a run
    (tmp_path / "root" / HISTORY / "_tmp-deadbeef").write_bytes(b"PAR1 half a file")
    table = read_history(root)
    assert table.num_rows == 48
    assert sorted(set(table.column("run_id").to_pylist())) == [f"run-{i:02d}" for i in range(24)]
    assert table.column("time").to_pylist() == sorted(table.column("time").to_pylist())
    history = str(tmp_path / "root" / HISTORY)
    assert pq.read_table(history).num_rows == 48
    assert len(pd.read_parquet(history)) == 48
    assert duckdb.sql(f"select count(*) from '{history}/*.parquet'").fetchall() == [(48,)]
    assert pl.read_parquet(f"{history}/*.parquet").height == 48
    row = next(r for r in table.to_pylist() if r["run_id"] == "run-07" and r["metric"] == "l1")
    assert row["per_class"] == [{"class": "a", "accuracy": 0.5}, {"class": "b", "accuracy": None}]
    assert row["overall"] == 0.07 and row["headline"] and row["total_seconds"] == 3.0
    assert read_history(Root(str(tmp_path / "empty"))).num_rows == 0


def test_history_rows_table_equals_pyarrow_from_python_objects():
    """rows_table goes through Arrow's JSON reader (no pandas import); it must build the same table."""
    import pyarrow as pa

    from pixelsim.storage.history import SCHEMA, rows_table
    plus2 = timezone(timedelta(hours=2))
    rows = [{"run_id": "r-1", "time": datetime(2026, 11, 29, 10, 56, 32, 123456, tzinfo=plus2), "dataset": "dígits",
             "source_url": None, "source_sha256": "ab" * 32, "metric": m, "headline": m == "l1", "balanced": 0.5,
             "overall": 1 / 3, "per_class": [{"class": "3", "accuracy": 0.9168316831683169},
                                             {"class": "sept \"7\"", "accuracy": None}],
             "steps": [{"step": "download", "seconds": 0.017, "cached": True}],
             "total_seconds": 4.812, "report": "reports/x"} for m in ("l1", "rmse")]
    got, want = rows_table(rows), pa.Table.from_pylist(rows, schema=SCHEMA)
    assert got.schema == SCHEMA and got.equals(want)
    assert got.column("time")[0].as_py() == datetime(2026, 11, 29, 8, 56, 32, 123456, tzinfo=timezone.utc)
