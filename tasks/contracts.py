"""What the steps exchange: the run's options, and one small frozen record per step output.

Every knob is written here once, with its default, and checked once when the options are
built. An output record describes a published folder of the storage root; the same record
is stored in that folder's manifest, so it can be rebuilt from the root alone
(`load`) and checked against it (`verify`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pixelsim.storage import catalog, env
from pixelsim.storage.errors import IntegrityError, OptionError
from pixelsim.storage.root import Root
from pixelsim.storage.layout import Layout
from pixelsim.storage.shards import PlanGroup

METRICS = ("l1", "rmse")
DEFAULT_ROOT = "pixelsim-data"
DEFAULT_DATASET = "mnist_sample"
MAX_SIDE = 16384   # pixels per side of --resize: larger ones would not fit in memory anyway
MAX_COUNT = 2**31 - 1   # images per shard, images skipped: more than any archive's members cap


@dataclass(frozen=True)
class Options:
    """The knobs of a run that shape its outputs (the CLI, the flow and the API share them)."""

    metric: str = "l1"                        # headline distance; both are always computed
    shard_size: int = 5000                    # images per Parquet shard
    channels: int = 1                         # 1: grayscale (luma), 3: RGB
    resize: tuple[int, int] | None = None     # (H, W) every image is resized to; None: all must match
    exact_resize: bool = False                # with resize: decode JPEGs at full size first (else reduced scale)
    classes: tuple[str, ...] | None = None    # a subset of the class folders
    train_split: str | None = None            # split folder names, when not the usual ones
    valid_split: str | None = None
    skip_bad: int = 0                         # unreadable images that may be left out
    device: str = "cpu"                       # torch device for templates and evaluation

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.metric not in METRICS:
            raise OptionError(f"--metric {self.metric}: use one of {', '.join(METRICS)}")
        if not isinstance(self.exact_resize, bool):
            raise OptionError(f"--exact-resize {self.exact_resize!r}: expected true or false")
        for name in ("shard_size", "channels", "skip_bad"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise OptionError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected a whole number")
        if not 1 <= self.shard_size <= MAX_COUNT:
            raise OptionError(f"--shard-size {self.shard_size}: must be 1 to {MAX_COUNT}")
        if self.channels not in (1, 3):
            raise OptionError(f"--channels {self.channels}: use 1 (grayscale) or 3 (RGB)")
        if not 0 <= self.skip_bad <= MAX_COUNT:
            raise OptionError(f"--skip-bad {self.skip_bad}: must be 0 to {MAX_COUNT}")
        if self.resize is not None:
            size = tuple(self.resize)
            if len(size) != 2 or not all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in size):
                raise OptionError(f"--resize {'x'.join(map(str, size))}: expected HxW, each side 1 to {MAX_SIDE}")
            fix("resize", size)
        if self.classes is not None:
            names = tuple(str(c).strip() for c in self.classes)
            if not names or any(not c for c in names):
                raise OptionError(f"--classes {','.join(names)}: give class folder names, e.g. 3,7")
            if len(set(names)) != len(names):
                raise OptionError(f"--classes {','.join(names)}: a class is named twice")
            if len(names) < 2:
                raise OptionError(f"--classes {','.join(names)}: name at least two classes (nearest template "
                                  "of one class is always right)")
            fix("classes", names)
        for name in ("train_split", "valid_split", "device"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "/" in value):
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: expected a folder name")
        if self.train_split is not None and self.train_split == self.valid_split:
            raise OptionError(f"--valid-split {self.valid_split}: the same folder as --train-split; evaluating on the "
                              "images the templates are made of would overstate the accuracy")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, in field order (for cache keys, run records and history rows)."""
        d = dataclasses.asdict(self)
        d["resize"] = list(self.resize) if self.resize else None
        d["classes"] = list(self.classes) if self.classes else None
        return d


@dataclass(frozen=True)
class Request:
    """One run: what to read, where to store it, and its options."""

    dataset: str = DEFAULT_DATASET            # a named dataset, or the name a --source is filed under
    source: str | None = None                 # archive URL or path; None: the dataset's own
    sha256: str | None = None                 # expected checksum of `source`
    root: str = DEFAULT_ROOT                  # storage root, a folder or fsspec URL
    refresh: bool = False                     # rebuild every step, reusing nothing
    offline: bool = False                     # never touch the network ($PIXELSIM_OFFLINE=1 too)
    options: Options = field(default_factory=Options)

    def __post_init__(self) -> None:
        try:
            catalog.checked_dataset(self.dataset)
        except ValueError as e:
            raise OptionError(f"--dataset: {e}") from None
        if self.source is not None and not str(self.source).strip():
            raise OptionError("--source is empty: give an archive URL or path, or leave it out")
        if self.sha256 is not None:
            sha = self.sha256.strip().lower()
            if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
                raise OptionError(f"--sha256 {self.sha256!r}: expected 64 hexadecimal digits")
            object.__setattr__(self, "sha256", sha)
        if not self.root or not str(self.root).strip():
            raise OptionError("--root is empty: give a folder or fsspec URL")

    def key(self) -> str:
        """A short digest of what was asked (dataset, source, pin, options): the same for reruns."""
        from pixelsim.storage.fetch import redact

        return catalog.step_key("run", "1", self.dataset, redact(self.source) if self.source else None, self.sha256,
                                self.options.to_dict())[:8]

    @classmethod
    def build(cls, dataset: str | None = None, source: str | None = None, sha256: str | None = None,
              root: str = DEFAULT_ROOT, refresh: bool = False, offline: bool = False, **options: Any) -> Request:
        """From flat parameters (the flow's form, the API's keywords); the dataset defaults to
        the source's file name, or to mnist_sample without a source."""
        unknown = set(options) - {f.name for f in dataclasses.fields(Options)}
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(sorted(unknown))}")
        if dataset is None:
            from pixelsim.tasks.download import dataset_name
            dataset = dataset_name(source) if source else DEFAULT_DATASET
        check_environment()
        offline = bool(offline) or env.flag(env.OFFLINE)
        return cls(dataset=dataset, source=source, sha256=sha256, root=root, refresh=refresh, offline=offline,
                   options=Options(**{k: v for k, v in options.items() if v is not None}))


def check_environment() -> None:
    """Read every PIXELSIM_* number, flag and folder once, so that a bad value fails before the run starts."""
    from pixelsim.storage.fetch import max_bytes
    from pixelsim.tasks import bounds, pool

    env.flag(env.OFFLINE)
    env.folder(env.LOCK_DIR)
    max_bytes()
    pool.workers()
    bounds.shard_bytes()
    bounds.max_memory()


def default_root() -> str:
    """$PIXELSIM_ROOT, else ./pixelsim-data."""
    return os.environ.get("PIXELSIM_ROOT") or DEFAULT_ROOT


R = TypeVar("R", bound="Output")


@dataclass(frozen=True)
class Output:
    """A published folder of the root; subclasses add what the next steps need to know."""

    root: str
    dir: str
    digest: str          # the manifest's digest: changes when any file in the folder does
    DEEP: ClassVar[bool | tuple[str, ...]] = True   # verify by re-hashing every file (or these; else sizes)

    @property
    def key(self) -> str:
        return catalog.key_of(self.dir)

    def uri(self) -> str:
        return Root(self.root).uri(self.dir)

    def record(self) -> dict[str, Any]:
        """What the manifest stores: everything but where the root is (a root can move)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("root", "digest")}

    def describe(self) -> str:
        """One line for a log: what this output holds."""
        return self.dir

    def verify(self) -> dict:
        """The folder's manifest, once every file it lists checks out and it is still this output."""
        manifest = Root(self.root).verify(self.dir, deep=self.DEEP)
        if manifest["digest"] != self.digest:
            raise IntegrityError(f"{self.uri()}: replaced by other content")
        return manifest

    @classmethod
    def load(cls: type[R], root: str, rel: str) -> R:
        """The record of a published folder, rebuilt from its verified manifest."""
        manifest = Root(root).verify(rel, deep=cls.DEEP)
        try:
            out = cls(root=root, digest=manifest["digest"], **manifest["record"])
        except (KeyError, TypeError) as e:
            raise IntegrityError(f"{Root(root).uri(rel)}: manifest holds no {cls.__name__} record ({e})") from None
        if out.dir != rel:   # another output's folder copied or moved here
            raise IntegrityError(f"{Root(root).uri(rel)}: holds the output of {out.dir}, not its own")
        return out


@dataclass(frozen=True)
class Archive(Output):
    file: str = ""           # the archive, relative to the root
    url: str = ""            # where it came from (credentials redacted)
    sha256: str = ""
    bytes: int = 0
    md5_head: str = ""

    def describe(self) -> str:
        return f"{self.bytes:,} bytes (sha256 {self.sha256[:12]}) from {self.url}"


@dataclass(frozen=True)
class Tree(Output):
    """The unpacked members: one blob plus a Parquet index. The index is re-hashed on every
    reuse (a flipped bit there could move an image to another class); the blob's members are
    re-hashed one by one as convert reads them, so its check compares sizes only."""

    DEEP: ClassVar[bool | tuple[str, ...]] = ("members.parquet",)
    files: int = 0
    archive_sha256: str = ""

    def describe(self) -> str:
        return f"{self.files:,} files unpacked from archive {self.archive_sha256[:12]}"


@dataclass(frozen=True)
class ShardJob:
    """One shard to build. Its members are a row group of the set's plan file (MEMBERS), read
    by the job itself: the job is a few small fields whatever the shard's size, so planning
    holds no per-image Python objects and Prefect has nothing large to walk or hash."""

    root: str
    dir: str
    name: str                # the task run's name, e.g. convert-train-00003
    split: str               # train or valid
    folder: str              # the split's folder in the archive
    file: str
    plan: str                # the set's MEMBERS file, relative to the root
    group: int               # this shard's row group in it
    blob: str
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    archive_sha256: str
    channels: int = 1
    resize: bool = False
    draft: bool = False      # with resize: JPEGs decode at the smallest scale at least that size
    skip_bad: bool = False
    parallel: bool = False   # build on the shared process pool
    digest: str = ""         # of the members' paths, labels and digests: what the shard's rows are made of
    reuse: str = ""          # JSON of the Part record of an earlier set's shard with exactly these members

    def rows(self) -> PlanGroup:
        return PlanGroup(self.plan, self.group, self.digest)


@dataclass(frozen=True)
class ShardPlan:
    """Every shard of a dataset, planned in the flow's process before any is built."""

    dir: str
    classes: tuple[str, ...]
    shape: tuple[int, ...]
    jobs: tuple[ShardJob, ...]
    layout: Layout | None = None   # where the splits and classes were found (its notes go in the report)
    pixels: str = ""         # catalog key of what makes pixels and labels (see convert.pixels_key)
    plan_file: dict[str, Any] = field(default_factory=dict)   # the MEMBERS file written: {file, sha256, bytes}


@dataclass(frozen=True)
class Part:
    """A file that one mapped task wrote into its folder, with what the finishing step needs."""

    file: str
    sha256: str
    bytes: int
    split: str = ""
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)       # images per class (shards)
    skipped: tuple[str, ...] = ()                              # bad files left out (shards)
    members: str = ""                                          # ShardJob.digest it was built for (shards)
    reused_from: str = ""                                      # the earlier set's shard it is a copy of
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)   # per metric: [true, predicted, n] cells

    def describe(self) -> str:
        if self.confusion:
            return f"{self.rows:,} images predicted by {', '.join(self.confusion)}"
        skipped = f", {len(self.skipped)} bad file(s) left out" if self.skipped else ""
        per_class = ", ".join(f"{c}: {n:,}" for c, n in self.counts.items())
        return f"{self.rows:,} images ({per_class}){skipped}, {self.bytes:,} bytes"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Part:
        return cls(**{**d, "skipped": tuple(d.get("skipped", ()))})


@dataclass(frozen=True)
class ShardSet(Output):
    dataset: str = ""
    classes: list[str] = field(default_factory=list)
    shape: list[int] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)    # split -> class -> images
    shards: dict[str, list[str]] = field(default_factory=dict)         # split -> shard files
    sha256: dict[str, str] = field(default_factory=dict)               # shard file -> sha256
    skipped: list[str] = field(default_factory=list)
    parts: dict[str, dict] = field(default_factory=dict)               # file name -> Part
    pixels: str = ""         # sets with equal `pixels` may share shards (incremental conversion)
    reused: dict[str, Any] = field(default_factory=dict)               # {"from", "shards", "images"}

    def images(self) -> int:
        return sum(n for split in self.counts.values() for n in split.values())


@dataclass(frozen=True)
class Templates(Output):
    dataset: str = ""
    classes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{len(self.classes)} class templates from {sum(self.counts.values()):,} training images"


@dataclass(frozen=True)
class EvalJob:
    root: str
    dir: str
    name: str
    dataset: str
    shard: str
    sha256: str
    templates: Templates
    device: str = "cpu"


@dataclass(frozen=True)
class EvalPlan:
    dir: str
    jobs: tuple[EvalJob, ...]


@dataclass(frozen=True)
class Evaluation(Output):
    dataset: str = ""
    classes: list[str] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    predictions: str = ""          # glob of the prediction files, relative to the root
    parts: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Report(Output):
    report: dict[str, Any] = field(default_factory=dict)   # report.json's content
    FILE: ClassVar[str] = "report.json"

    def record(self) -> dict[str, Any]:
        return {"dir": self.dir}     # the report itself is report.json, which the manifest lists

    def describe(self) -> str:
        r = self.report
        m = r["metrics"][r["metric"]]
        return f"{r['metric']} balanced {m['balanced']} over {len(r['classes'])} classes"

    @staticmethod
    def located(root: str | Root, report: dict[str, Any]) -> dict[str, Any]:
        """report.json's content with its root-relative artifacts as URIs of this `root`."""
        r = root if isinstance(root, Root) else Root(root)
        return {**report, "artifacts": {k: r.uri(v) for k, v in report["artifacts"].items()}}

    @classmethod
    def load(cls, root: str, rel: str) -> Report:
        out = super().load(root, rel)   # the folder verified, and its own
        try:
            report = cls.located(root, json.loads(Root(root).read_bytes(f"{rel}/{cls.FILE}")))
        except (ValueError, LookupError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{Root(root).uri(rel)}: unreadable {cls.FILE} ({e})") from None
        return dataclasses.replace(out, report=report)
