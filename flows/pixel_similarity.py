"""The pixel-similarity flow: wiring only. The step order is `pixelsim.flows.pipeline`'s, the
steps' work is in `pixelsim.tasks`, what the UI shows is in `pixelsim.flows.ui`."""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import SecretStr

from pixelsim.flows.pipeline import RunResult, run_pipeline
from pixelsim.flows.prefect_runner import PrefectRunner, heartbeats
from pixelsim.flows.ui import ConvertProgress, artifact_prefix, publish_artifacts
from pixelsim.storage.errors import PixelsimError
from pixelsim.storage.fetch import redact
from pixelsim.tasks.contracts import DEFAULT_ROOT, Options, Request


def masked_source(source: str | None) -> str | SecretStr | None:
    """A source URL carrying credentials, as a SecretStr: Prefect then records the flow run's
    `source` parameter as '**********' instead of storing the credentials in its database."""
    return SecretStr(source) if source and redact(source) != source else source


def run_name() -> str:
    """<dataset>-<metric>-<key of what was asked>, e.g. mnist_sample-l1-3f9a2c1e: reruns of the
    same request share a name, so the UI groups them at a glance."""
    params = dict(flow_run.parameters)
    if isinstance(params.get("source"), SecretStr):
        params["source"] = params["source"].get_secret_value()
    try:
        request = Request.build(**params)
    except (PixelsimError, TypeError):
        return "pixel-similarity"   # the flow's first line reports what is wrong
    return f"{request.dataset}-{request.options.metric}-{request.key()}"


def run_tags(request: Request) -> list[str]:
    return ["pixelsim", f"dataset:{request.dataset}", f"metric:{request.options.metric}"]


@flow(name="pixel-similarity", flow_run_name=run_name, log_prints=False)
def pixel_similarity(dataset: str | None = None, source: str | SecretStr | None = None, root: str = DEFAULT_ROOT,
                     metric: str = Options.metric, refresh: bool = False, shard_size: int = Options.shard_size,
                     channels: int = Options.channels, resize: list[int] | None = None,
                     classes: list[str] | None = None, train_split: str | None = None,
                     valid_split: str | None = None, device: str = Options.device, sha256: str | None = None,
                     skip_bad: int = Options.skip_bad, offline: bool = False) -> RunResult:
    """Archive -> unpacked members -> shards -> templates -> predictions -> report."""
    request = Request.build(dataset=dataset, source=source.get_secret_value() if isinstance(source, SecretStr)
                            else source, sha256=sha256, root=root, refresh=refresh, metric=metric,
                            shard_size=shard_size, channels=channels, resize=resize, classes=classes,
                            train_split=train_split, valid_split=valid_split, device=device, skip_bad=skip_bad,
                            offline=offline)
    with heartbeats():
        result = run_pipeline(request, PrefectRunner(request.refresh,
                                                     {"convert": ConvertProgress(artifact_prefix(request))}))
        publish_artifacts(request, result)
    return result
