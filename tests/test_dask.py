"""The mapped steps on a real engine: an existing Dask cluster (scheduler + two worker processes)."""
from __future__ import annotations

import pytest

from conftest import TINY, TINY_FIGURES, assert_figures

distributed = pytest.importorskip("distributed")


def test_run_on_an_existing_dask_cluster(cli):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        r = cli("run", "--source", str(TINY), "--shard-size", "300", "--task-runner", "dask",
                "--dask-address", cluster.scheduler_address, "--json")
        assert r.code == 0, r.stderr
        assert_figures(r.report, TINY_FIGURES)
        # download, untar, templates and report ran in the CLI's process (their logs are there);
        # the 6 convert and 3 evaluate shard tasks ran on the two workers
        assert sorted(set(r.states())) == ["Completed"] and len(r.states()) == 4
        ran = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert len(ran) == 2 and sum(ran.values()) >= 9
