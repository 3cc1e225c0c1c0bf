"""The pixel-similarity flow: wiring only. The step order is `pixelsim.flows.pipeline`'s, the
steps' work is in `pixelsim.tasks`, what the UI shows is in `pixelsim.flows.ui`."""
from __future__ import annotations

from prefect import flow
from pydantic import SecretStr

from pixelsim.flows.pipeline import RunResult, run_pipeline
from pixelsim.flows.prefect_runner import PrefectRunner
from pixelsim.flows.ui import ConvertProgress, publish_artifacts
from pixelsim.storage.fetch import redact
from pixelsim.tasks.contracts import DEFAULT_ROOT, Options, Request


def masked_source(source: str | None) -> str | SecretStr | None:
    """A source URL carrying credentials, as a SecretStr: Prefect then records the flow run's
    `source` parameter as '**********' instead of storing the credentials in its database."""
    return SecretStr(source) if source and redact(source) != source else source


@flow(name="pixel-similarity", log_prints=False)
def pixel_similarity(dataset: str | None = None, source: str | SecretStr | None = None, root: str = DEFAULT_ROOT,
                     metric: str = Options.metric, refresh: bool = False, shard_size: int = Options.shard_size,
                     channels: int = Options.channels, resize: list[int] | None = None,
                     classes: list[str] | None = None, train_split: str | None = None,
                     valid_split: str | None = None, device: str = Options.device, sha256: str | None = None,
                     skip_bad: int = Options.skip_bad) -> RunResult:
    """Archive -> unpacked members -> shards -> templates -> predictions -> report."""
    request = Request.build(dataset=dataset, source=source.get_secret_value() if isinstance(source, SecretStr)
                            else source, sha256=sha256, root=root, refresh=refresh, metric=metric,
                            shard_size=shard_size, channels=channels, resize=resize, classes=classes,
                            train_split=train_split, valid_split=valid_split, device=device, skip_bad=skip_bad)
    result = run_pipeline(request, PrefectRunner(request.refresh, {"convert": ConvertProgress(request.dataset)}))
    publish_artifacts(request.dataset, result.report, result.cached, result.outputs.templates)
    return result
