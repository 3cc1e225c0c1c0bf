"""Named datasets: pinned sources (fastai pins size and the md5 of the first MiB)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str
    pins: dict
    description: str
    bundled: str | None = None           # a copy shipped in flows/data, used when `url` is unreachable
    bundled_pins: dict = field(default_factory=dict)

    def source_url(self) -> str:
        """The official URL, unless $PIXELSIM_URL_<NAME> points at a mirror (or, in tests, nowhere)."""
        return os.environ.get(f"PIXELSIM_URL_{self.name.upper()}", self.url)

    def bundled_path(self) -> str | None:
        return str(resources.files("pixelsim.flows") / "data" / self.bundled) if self.bundled else None


DATASETS = {d.name: d for d in [
    Dataset("mnist_sample", "https://s3.amazonaws.com/fast-ai-sample/mnist_sample.tgz",
            {"size": 3214948, "md5_head": "2dbc7ec6f9259b583af0072c55816a88"},
            "MNIST 3s and 7s (fastbook chapter 4): 12,396 train / 2,038 valid",
            bundled="mnist_sample.tgz",
            bundled_pins={"size": 3396206,
                          "sha256": "feba62848df904f60b47afc0ae1cf4deaa8e0d484c5ad18ae9d0e0e8a2cb1706"}),
    Dataset("mnist_tiny", "https://s3.amazonaws.com/fast-ai-sample/mnist_tiny.tgz",
            {"size": 342207, "md5_head": "56143e8f24db90d925d82a5a74141875"},
            "MNIST 3s and 7s, 700 train / 699 valid, plus an unlabeled test/ folder"),
    Dataset("mnist", "https://s3.amazonaws.com/fast-ai-imageclas/mnist_png.tgz",
            {"size": 15683414, "md5_head": "03639f83c4e3d19e0a3a53a8a997c487"},
            "full MNIST, ten classes in training/ and testing/"),
]}

