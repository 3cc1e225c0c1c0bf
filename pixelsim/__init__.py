"""pixelsim: the fastbook chapter 4 pixel-similarity baseline as a cached, inspectable pipeline.

    import pixelsim
    result = pixelsim.run("mnist_sample", root="pixelsim-data")   # in-process, no Prefect server
    run = pixelsim.open("pixelsim-data").latest("mnist_sample")
    images, labels, classes = run.load_split("valid")

The subpackages live in the repository's top-level folders: `pixelsim.flows` (the flow, the
pipeline, the CLI and this API), `pixelsim.tasks` (one module per step) and `pixelsim.storage`
(paths, formats, manifests). Names load on first use, so `import pixelsim` is instant.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "pixelsim.flows.api", "open": "pixelsim.flows.api", "Store": "pixelsim.flows.api",
    "RunView": "pixelsim.flows.api", "RunResult": "pixelsim.flows.pipeline",
    "Options": "pixelsim.tasks.contracts", "Request": "pixelsim.tasks.contracts",
    **{name: "pixelsim.storage.errors" for name in (
        "PixelsimError", "TransientError", "DownloadError", "TransientDownloadError", "ChecksumError",
        "ArchiveError", "ImageError", "LayoutError", "IntegrityError", "NotPublished", "OptionError")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pixelsim' has no attribute {name!r}")
