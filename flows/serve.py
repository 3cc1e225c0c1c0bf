"""`pixelsim serve`: the flow as a deployment on a cron schedule, run by this process.

Work-pool users get the same deployment from `prefect.yaml` at the repository root.
"""
from __future__ import annotations

import os
import sys
from typing import Any

DESCRIPTION = "fastbook ch.4 pixel similarity: archive -> shards -> class templates -> accuracy report"


def deployment_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The values set, with local paths made absolute: scheduled runs must not depend on where
    the serving process was started."""
    out = {k: v for k, v in params.items() if v is not None}
    for k in ("root", "source"):
        if isinstance(out.get(k), str) and "://" not in out[k]:
            out[k] = os.path.abspath(out[k])
    return out


def has_server() -> bool:
    """A temporary server (no PREFECT_API_URL) dies with this process and creates no scheduled runs."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def taken_by_another(name: str) -> str | None:
    """Why serving `pixel-similarity/<name>` would silently replace someone else's deployment:
    one made by `prefect deploy` (it runs on a work pool), or one that another process is
    serving right now. None when the name is free, or a served one nobody polls any more."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.exceptions import ObjectNotFound

    full = f"pixel-similarity/{name}"
    with get_client(sync_client=True) as c:
        try:
            dep = c.read_deployment_by_name(full)
        except ObjectNotFound:
            return None
    if dep.work_pool_name:
        return (f"deployment {full} exists on work pool {dep.work_pool_name} (made by `prefect deploy`); serving "
                f"would replace it: pass --name, or delete it first (`prefect deployment delete {full}`)")
    if dep.status == DeploymentStatus.READY:
        return f"deployment {full} is being served by another process right now: pass --name, or stop that one"
    return None


def serve(params: dict[str, Any], *, cron: str, name: str, task_runner: Any = None,
          tags: list[str] | None = None) -> int:
    """Register the deployment `pixel-similarity/<name>` and run its flow runs until interrupted."""
    if not has_server():
        print("pixelsim: error: serve needs a Prefect server that keeps running, and PIXELSIM_SERVER=temporary "
              "gives none: unset it (pixelsim then starts its own), or point PREFECT_API_URL at one started with "
              "`prefect server start`", file=sys.stderr)
        return 2
    if taken := taken_by_another(name):
        print(f"pixelsim: error: {taken}", file=sys.stderr)
        return 2
    from prefect.deployments.runner import EntrypointType

    from pixelsim.flows.pixel_similarity import pixel_similarity

    flow = pixel_similarity.with_options(task_runner=task_runner) if task_runner else pixel_similarity
    flow.serve(name=name, cron=cron, parameters=deployment_parameters(params), description=DESCRIPTION,
               tags=tags or ["pixelsim"], entrypoint_type=EntrypointType.MODULE_PATH)
    return 0
