"""`--root s3://bucket/prefix` end to end, against a local S3 endpoint (moto's server on 127.0.0.1).

s3fs is pointed at it the way a user would point it at MinIO or Ceph: fake credentials in
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint in AWS_ENDPOINT_URL_S3, nothing in the URL.
"""
from __future__ import annotations

import gzip
import json
import os

import pytest

from conftest import TINY, TINY_FIGURES, assert_figures, free_port, grow, plain_pipeline

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "pixelsim-test"
FOLDERS = ("archives", "extracted", "shards", "templates", "evaluations", "reports")


@pytest.fixture(scope="module")
def s3():
    """The endpoint's environment for the CLI, and a filesystem to inspect the bucket with."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield env, fs
    server.stop()


def objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.removeprefix(f"{BUCKET}/{prefix}/") for p in fs.find(f"{BUCKET}/{prefix}"))


def test_full_run_cached_rerun_and_atomic_publication(cli, s3, tmp_path):
    env, fs = s3
    root = f"s3://{BUCKET}/runs"
    first = cli("run", "--source", str(TINY), "--root", root, "--json", env=env)
    assert first.code == 0, first.stderr
    rep = first.report
    assert_figures(rep, TINY_FIGURES)
    assert first.states() == ["Completed"] * 7
    assert rep["artifacts"]["report"].startswith(f"{root}/reports/mnist_tiny/")
    stored = json.loads(fs.cat(f"{rep['artifacts']['report']}/report.json"))
    assert stored == {**rep, "artifacts": {k: v.removeprefix(f"{root}/") for k, v in rep["artifacts"].items()}}

    keys = objects(fs, "runs")
    assert not [k for k in keys if ".tmp-" in k or "/_parts/" in k], "staging objects left behind"
    manifests = [k for k in keys if k.endswith("/_manifest.json")]
    assert sorted({m.split("/")[0] for m in manifests}) == sorted(FOLDERS)
    for m in manifests:   # every published folder holds exactly what its manifest lists
        folder = m.rsplit("/", 1)[0]
        listed = {f["name"]: f["bytes"] for f in json.loads(fs.cat(f"{BUCKET}/runs/{m}"))["files"]}
        held = {k[len(folder) + 1:]: fs.size(f"{BUCKET}/runs/{k}") for k in keys
                if k.startswith(folder + "/") and k != m}
        assert held == listed, folder

    again = cli("run", "--source", str(TINY), "--root", root, "--json", env=env)
    assert again.code == 0, again.stderr
    assert again.states() == ["Cached"] * 7
    assert "reused cached results for 6 of 6 steps" in again.stderr
    assert again.report == rep
    assert not [k for k in objects(fs, "runs") if ".tmp-" in k]

    # another machine: its own PREFECT_HOME and result store, the same root: the cache is the root
    home = tmp_path / "other-host"
    other = cli("run", "--source", str(TINY), "--root", root, "--json",
                env={**env, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "results")})
    assert other.code == 0, other.stderr
    assert other.states() == ["Cached"] * 7 and "reused cached results for 6 of 6 steps" in other.stderr
    assert other.report == rep


def test_failed_run_publishes_nothing(cli, s3, tmp_path):
    env, fs = s3
    bad = tmp_path / "mnist_tiny.tgz"
    bad.write_bytes(gzip.compress(gzip.decompress(TINY.read_bytes())[:200_000]))   # a tar cut short
    r = cli("run", "--source", str(bad), "--root", f"s3://{BUCKET}/failed", env=env)
    assert r.code == 1
    assert "corrupt or truncated" in r.stderr
    # the download itself was fine and is kept (with its manifest); nothing derived from it is published
    keys = objects(fs, "failed")
    assert {k.split("/")[0] for k in keys} == {"archives"}, keys


def test_dask_workers_on_an_s3_root_give_the_same_figures_and_a_second_client_reuses_them(cli, s3, tmp_path):
    """Convert and evaluate on a Dask cluster whose workers are separate processes with their own
    PREFECT_HOME and working folder: all they share with the client is the s3:// root."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    env, fs = s3
    root = f"s3://{BUCKET}/dask"
    preload = tmp_path / "worker_setup.py"
    preload.write_text("import os, tempfile\n\ndef dask_setup(worker):\n"
                       "    os.chdir(tempfile.mkdtemp(prefix='dask-worker-cwd-'))\n")
    worker_env = {**env, "PREFECT_HOME": str(tmp_path / "worker-home"), "PREFECT_API_URL": cli.env["PREFECT_API_URL"],
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, env=worker_env, preload=[str(preload)]) as cluster, \
            distributed.Client(cluster) as client:
        assert len(set(client.run(os.getcwd).values()) | {os.getcwd()}) == 3   # three working folders
        args = ("run", "--source", str(TINY), "--root", root, "--shard-size", "300", "--task-runner", "dask",
                "--dask-address", cluster.scheduler_address, "--json")
        first = cli(*args, env=env)
        assert first.code == 0, first.stderr
        assert_figures(first.report, TINY_FIGURES)
        ran = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert len(ran) == 2 and sum(ran.values()) >= 9          # 6 convert and 3 evaluate shard tasks
        home = tmp_path / "second-client"
        again = cli(*args, env={**env, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "results")})
    assert again.code == 0, again.stderr
    assert "reused cached results for 6 of 6 steps" in again.stderr and again.report == first.report
    assert not [k for k in objects(fs, "dask") if ".tmp-" in k or "/_parts/" in k]


def test_a_grown_archive_reuses_shards_on_s3(s3, folder, tmp_path, monkeypatch):
    """Incremental conversion on an object store: earlier shards are copied server-side and
    re-hashed, only the new images are decoded, and the figures are a from-scratch run's."""
    env, fs = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    root = f"s3://{BUCKET}/grown"
    first = plain_pipeline(root, folder, shard_size=100)
    grow(folder, 3)
    grown = plain_pipeline(root, folder, shard_size=100)
    assert grown.outputs.shards.reused == {"from": first.outputs.shards.dir, "shards": 14, "images": 1400}
    scratch = plain_pipeline(str(tmp_path / "scratch"), folder, shard_size=100)
    assert grown.report["metrics"] == scratch.report["metrics"]
    keys = objects(fs, f"grown/{grown.outputs.shards.dir}")
    assert "_plan/members.parquet" in keys and not [k for k in keys if ".tmp-" in k or "_parts/" in k]


def test_an_object_store_root_without_credentials_is_one_line_in_every_command(cli, s3):
    """botocore's errors are not OSErrors: unwrapped, each command ended in a traceback, and
    `run` started Prefect first. Now `run` fails before Prefect starts, naming the root."""
    env, _ = s3
    anonymous = {**env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}
    root = f"s3://{BUCKET}/nobody"
    for command in (["run", "--source", str(TINY)], ["show"], ["runs"], ["diff"]):
        r = cli(*command, "--root", root, env=anonymous)
        assert r.code == 1, (command, r.stderr)
        last = r.stderr.strip().splitlines()
        assert len(last) == 1 and "Traceback" not in r.stderr, (command, r.stderr)
        assert last[0].startswith("pixelsim: error: ") and root in last[0] and "NoCredentialsError" in last[0]
        if command[0] == "run":
            assert last[0].startswith(f"pixelsim: error: --root {root}: the storage backend refused")
    missing = cli("run", "--source", str(TINY), "--root", "s3://no-such-bucket/r", env=env)
    assert missing.code == 1 and missing.stderr.strip().splitlines() == [
        "pixelsim: error: --root s3://no-such-bucket/r: there is no bucket no-such-bucket (or these credentials "
        "cannot see it): create it first"]
