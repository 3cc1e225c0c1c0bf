"""The pixel-similarity flow: wiring only. The step order is `pixelsim.flows.pipeline`'s, the
steps' work is in `pixelsim.tasks`, what the UI shows is in `pixelsim.flows.ui`."""
# no `from __future__ import annotations` here: Prefect builds the parameters' validator from
# these annotations at run time, and string annotations would not resolve there

from prefect import flow
from prefect.runtime import flow_run
from typing import Annotated, Literal

from pydantic import Field, SecretStr

from pixelsim.flows.pipeline import RunResult, run_pipeline
from pixelsim.flows.prefect_runner import PrefectRunner, heartbeats
from pixelsim.flows.ui import ConvertProgress, artifact_prefix, publish_artifacts
from pixelsim.storage.errors import PixelsimError
from pixelsim.storage.fetch import redact
from pixelsim.tasks.contracts import DEFAULT_ROOT, MAX_SIDE, METRICS, Options, Request


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


Metric = Literal[METRICS]
Count = Annotated[int, Field(ge=1)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]


@flow(name="pixel-similarity", flow_run_name=run_name, log_prints=False, validate_parameters=True)
def pixel_similarity(dataset: str | None = None, source: str | SecretStr | None = None, root: str = DEFAULT_ROOT,
                     metric: Metric = Options.metric, refresh: bool = False, shard_size: Count = Options.shard_size,
                     channels: Literal[1, 3] = Options.channels,
                     resize: Annotated[list[Side], Field(min_length=2, max_length=2)] | None = None,
                     exact_resize: bool = False,
                     classes: Annotated[list[str], Field(min_length=2)] | None = None,
                     train_split: str | None = None, valid_split: str | None = None, device: str = Options.device,
                     sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None,
                     skip_bad: Annotated[int, Field(ge=0)] = Options.skip_bad, offline: bool = False) -> RunResult:
    """Archive -> unpacked members -> shards -> templates -> predictions -> report.

    The types are the form the Prefect UI shows for a deployment's run, and the server checks a
    run's parameters against them before the run starts; `Options` checks them again.

    Args:
        dataset: a named dataset (mnist_sample, mnist_tiny, mnist) or, with source, the name its outputs are filed under
        source: archive URL or path (any fsspec URL); never falls back
        root: storage root, a folder or fsspec URL
        metric: headline distance (both are computed)
        refresh: recompute every step, ignoring cached results
        shard_size: images per Parquet shard
        channels: 1 grayscale (luma), 3 RGB
        resize: [height, width] every image is resized to, instead of failing on mixed sizes
        exact_resize: with resize, decode every JPEG at full size first (slower; else at a reduced scale)
        classes: class folders to use (at least two), e.g. ["3", "7"]
        train_split: name of the training split folder
        valid_split: name of the validation split folder
        device: torch device for templates and evaluation
        sha256: expected sha256 of the source archive
        skip_bad: leave out at most this many unreadable images (listed in the report)
        offline: never touch the network
    """
    request = Request.build(dataset=dataset, source=source.get_secret_value() if isinstance(source, SecretStr)
                            else source, sha256=sha256, root=root, refresh=refresh, metric=metric,
                            shard_size=shard_size, channels=channels, resize=resize, exact_resize=exact_resize,
                            classes=classes,
                            train_split=train_split, valid_split=valid_split, device=device, skip_bad=skip_bad,
                            offline=offline)
    with heartbeats():
        result = run_pipeline(request, PrefectRunner(request.refresh,
                                                     {"convert": ConvertProgress(artifact_prefix(request))}))
        publish_artifacts(request, result)
    return result
