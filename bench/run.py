"""pixelsim benchmark: `python -m bench.run [--data TGZ] [--images N ...] [--out bench/out] [--skip-scale]`.

Every measurement runs in its own subprocess (`--worker NAME IN OUT`, `pixelsim`, `prefect`), so it pays
its own imports and inherits nothing warm; this module imports only the standard library at the top.
"""
from __future__ import annotations

import argparse, contextlib, datetime, io, json, os, platform, re, resource  # noqa: E401
import shutil, signal, socket, subprocess, sys, tarfile, time, urllib.request  # noqa: E401
from statistics import median
import importlib.metadata as md
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATASET = "mnist_sample"
REPEAT = 3   # runs of A, C and D [pixelsim]; the median is reported
MODES = ("pixelsim", "temporary")   # C/D/E: pixelsim's own background server (the default), a temporary one


def vmhwm(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss, nor wait4's: Linux carries
    the spawning parent's peak into a child started by vfork+exec, as subprocess does, so those
    report at least the benchmark's own size (which grows with the synthetic data it makes)."""
    return vmhwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    """(result, {"s": wall seconds, "cpu": CPU seconds of this process and its children})."""
    cpu = lambda: sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime")  # noqa: E731
                      for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    t, c = time.perf_counter(), cpu()
    out = fn(*args, **kwargs)
    return out, {"s": time.perf_counter() - t, "cpu": cpu() - c}


# ---------------------------------------------------------------- workers (run in subprocesses)
def w_seed(p: dict) -> dict:
    """A: the fastbook notebook's way, generalised to N classes (argmin over the class means)."""
    import numpy as np
    import torch
    from PIL import Image
    t0, base = time.perf_counter(), Path(p["base"])
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())

    def load(split: str, c: str) -> torch.Tensor:
        files = sorted((base / split / c).iterdir())
        return torch.stack([torch.tensor(np.array(Image.open(f))) for f in files]).float() / 255

    train, valid = [load("train", c) for c in classes], [load("valid", c) for c in classes]
    t1 = time.perf_counter()
    means = [t.mean(0) for t in train]
    dist = {"l1": lambda a, b: (a - b).abs().mean((-1, -2)),
            "rmse": lambda a, b: ((a - b) ** 2).mean((-1, -2)).sqrt()}
    acc = {m: {} for m in dist}
    for m, fn in dist.items():
        for i, (c, v) in enumerate(zip(classes, valid)):
            pred = torch.stack([fn(v, mu) for mu in means]).argmin(0)
            acc[m][c] = int((pred == i).sum()) / len(v)
    return {"classes": classes, "accuracy": acc, "load_s": t1 - t0, "s": time.perf_counter() - t0}


def w_extract(p: dict) -> dict:
    """A's first step, the seed's `untar_data`: tarfile extraction of every member to its own file."""
    def run():
        with tarfile.open(p["data"]) as tf:
            tf.extractall(p["dest"], filter="data")
    return timed(run)[1]


class TimedRunner:
    """The plain runner, timing each step's wall and CPU seconds (made in the worker: the import
    of pixelsim stays outside the clock)."""

    @staticmethod
    def make():
        from pixelsim.flows.runners import PlainRunner

        class Timed(PlainRunner):
            def __init__(self):
                super().__init__()
                self.times: dict = {}

            def step(self, name, fn, *args, **kwargs):
                out, self.times[name] = timed(super().step, name, fn, *args, **kwargs)
                return out

            def map(self, name, fn, jobs):
                out, self.times[name] = timed(super().map, name, fn, jobs)
                return out
        return Timed()


def w_steps(p: dict) -> dict:
    """B: pixelsim's pipeline with the plain runner (no Prefect), cold, on a fresh root."""
    from pixelsim.flows.pipeline import run_pipeline
    from pixelsim.tasks.contracts import Request
    import pandas  # noqa: F401 - pyarrow imports it on first use; imports are outside the clock, as in A
    import torch  # noqa: F401 - imported before timing, as A imports it before its clock starts
    runner = TimedRunner.make()
    request = Request.build(source=p["data"], dataset=DATASET, root=p["root"])
    result, total = timed(run_pipeline, request, runner)
    out = result.outputs
    acc = {m: dict(zip(out.evaluation.classes, v["per_class"])) for m, v in out.evaluation.metrics.items()}
    return {"steps": runner.times, "total": total, "tree": out.tree.dir, "layout_base": layout_base(out.shards),
            "shards": {"dir": out.shards.dir, "train": out.shards.shards["train"], "counts": out.shards.counts},
            "accuracy": acc}


def layout_base(shards) -> str:
    """The folder of the archive that holds the split folders (the seed script starts there)."""
    from pixelsim.storage.shards import iter_arrays
    from pixelsim.storage.root import Root
    (batch,) = iter_arrays(Root(shards.root), shards.shards["train"][:1], ("path",))
    first = batch["path"][0]
    split = next(f for f in ("train", "training") if f"/{f}/" in f"/{first}")
    return first[:f"/{first}".index(f"/{split}/")]


def w_decode(p: dict) -> dict:
    """F and the decode rates: shards -> one array vs decoding the same training PNGs again."""
    import numpy as np
    from PIL import Image
    from pixelsim.storage.images import decode, decoder_name
    from pixelsim.storage.root import Root
    from pixelsim.storage.shards import iter_arrays
    r, train = Root(p["root"]), p["shards"]["train"]
    names = [path for b in iter_arrays(r, train, ("path",)) for path in b["path"]]
    files, n = [Path(p["seed_tree"], f) for f in names], len(names)
    pillow = lambda b: np.array(Image.open(io.BytesIO(b)))  # noqa: E731
    fastest = ("pillow", pillow)
    with contextlib.suppress(ImportError):
        import pyspng
        fastest = ("pyspng", pyspng.load)

    def load():
        return timed(lambda: np.concatenate([b["image"] for b in iter_arrays(r, train)]))
    (arr, t_first), t_shards = load(), min((load()[1] for _ in range(3)), key=lambda t: t["s"])

    def read_decode(fn):
        return timed(lambda: np.stack([fn(f.read_bytes()) for f in files]).reshape(n, -1))
    fast, t_fast = read_decode(fastest[1])
    _, t_pil = read_decode(pillow)
    blobs = [f.read_bytes() for f in files]
    _, t_dec = timed(lambda: [decode(b, f) for b, f in zip(blobs, names)])
    _, t_raw = timed(lambda: [fastest[1](b) for b in blobs])
    return {"images": n, "same_pixels": bool(arr.shape == fast.shape and (arr == fast).all()),
            "fastest": fastest[0], "decoder": decoder_name(),
            "rate": {"shards": n / t_shards["s"], "shards_first": n / t_first["s"], "fastest": n / t_fast["s"],
                     "pillow": n / t_pil["s"], "decode": n / t_dec["s"], "raw": n / t_raw["s"]}}


def w_step(p: dict) -> dict:
    """G: one step of the scale run on a persistent root, from the previous step's output folder."""
    from pixelsim.flows import pipeline
    from pixelsim.flows.runners import PlainRunner
    from pixelsim.tasks.contracts import Archive, Options, ShardSet, Templates, Tree
    from pixelsim.tasks.templates import compute_templates
    from pixelsim.tasks.untar import untar_archive
    root, name = p["root"], p["step"]
    import pandas  # noqa: F401 - pyarrow imports it on first use; imports are outside the clock, as in A
    if name in ("templates", "evaluate"):
        import torch  # noqa: F401 - imported before timing, as A imports it before its clock starts
    if name == "untar":
        archive = Archive.load(root, p["archive"])   # re-hashes the archive: not part of the step, as for convert's Tree
        out, t = timed(lambda: untar_archive(archive).value)
    elif name == "convert":
        tree = Tree.load(root, p["tree"])
        out, t = timed(lambda: pipeline.convert(PlainRunner(), tree, "synthetic", Options())[0])
        from pixelsim.tasks import pool
        procs = getattr(pool._pool, "_processes", None) or {}   # the shard-building workers, still up
        t["workers_rss_mb"] = sum(vmhwm(pid) for pid in procs)
        t["cpu"] += sum(cpu_s(pid) for pid in procs)   # still running, so not yet in RUSAGE_CHILDREN
        t["reused_images"] = out.reused.get("images", 0)
    elif name == "templates":
        shards = ShardSet.load(root, p["shards"])
        out, t = timed(lambda: compute_templates(shards).value)
    else:
        shards, tmpl = ShardSet.load(root, p["shards"]), Templates.load(root, p["templates"])
        out, t = timed(lambda: pipeline.evaluate(PlainRunner(), shards, tmpl, "cpu"))
    return {"out": out.dir, **t}


def w_limits(p: dict) -> dict:
    """G's limits, measured in the same run on the same data: the bare per-member costs that no
    implementation of a step can avoid. untar: sha256 of every member (one core; a plain tar has
    nothing to inflate); convert: a bare pyspng decode per image on every core, plus the sha256
    check of its bytes; templates and evaluate: reading their shards once (zstd + Parquet)."""
    import hashlib
    import numpy as np
    from pixelsim.storage.root import Root
    from pixelsim.storage.shards import iter_arrays, member_bytes
    from pixelsim.tasks.contracts import ShardSet, Tree
    from pixelsim.tasks.convert import tree_index
    root = Root(p["root"])
    tree, shards = Tree.load(p["root"], p["tree"]), ShardSet.load(p["root"], p["shards"])
    index = tree_index(tree)[0]
    sample = index.slice(0, 20_000).to_pylist()
    datas = member_bytes(root, f"{tree.dir}/members.bin", [r["offset"] for r in sample], [r["size"] for r in sample])
    _, t_hash = timed(lambda: [hashlib.sha256(d).digest() for d in datas])
    try:
        from pyspng import load as decode
    except ImportError:
        from PIL import Image
        decode = lambda b: np.asarray(Image.open(io.BytesIO(b)))  # noqa: E731
    _, t_dec = timed(lambda: [decode(d) for d in datas])
    k = len(shards.classes)

    def means() -> np.ndarray:   # a plain numpy script: integer sums per class, then divide
        sums, counts = np.zeros((k, int(np.prod(shards.shape))), np.int64), np.zeros(k, np.int64)
        for b in iter_arrays(root, shards.shards["train"]):
            for c in range(k):
                sums[c] += b["image"][b["label_index"] == c].sum(0, dtype=np.int64)
            counts += np.bincount(b["label_index"], minlength=k)
        return (sums / counts[:, None] / 255).astype(np.float32)
    tmpl, t_train = timed(means)

    def nearest() -> int:   # L1 and RMSE to every template, argmin, one shard at a time
        right = 0
        for b in iter_arrays(root, shards.shards["valid"]):
            for s in range(0, len(b["image"]), 512):
                x = b["image"][s:s + 512].astype(np.float32) / 255
                d = x[:, None, :] - tmpl[None]
                right += int((np.abs(d).mean(-1).argmin(1) == b["label_index"][s:s + 512]).sum())
                right += int((np.sqrt((d * d).mean(-1)).argmin(1) == b["label_index"][s:s + 512]).sum())
        return right
    _, t_valid = timed(nearest)
    return {"hash": len(datas) / t_hash["s"], "decode": len(datas) / t_dec["s"],
            "templates_s": t_train["s"], "evaluate_s": t_valid["s"], "cores": os.cpu_count(), "images": len(index)}


def w_jpeg(p: dict) -> dict:
    """J: a JPEG dataset of mixed sizes resized to 28x28: full decode + resize (--exact-resize)
    against libjpeg's reduced-scale decode + resize (the default with --resize), one core."""
    import numpy as np
    from PIL import Image
    from pixelsim.storage.images import decode
    rng, blobs = np.random.default_rng(0), []
    for i in range(p.get("n", 600)):   # smooth colour content, 240-640 px a side, like small photos
        h, w = (int(v) for v in rng.integers(240, 641, 2))
        small = rng.integers(0, 256, (h // 24 + 1, w // 24 + 1, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())

    def run(draft: bool):
        return timed(lambda: np.stack([decode(b, f"{i}.jpg", size=(28, 28), resize=True, draft=draft)
                                       for i, b in enumerate(blobs)]))
    (exact, t_exact), (fast, t_fast) = run(False), run(True)
    (_, t_exact2), (_, t_fast2) = run(False), run(True)
    diff = np.abs(fast.astype(int) - exact.astype(int))
    n = len(blobs)
    return {"images": n, "mean_side": float(np.mean([Image.open(io.BytesIO(b)).size for b in blobs])),
            "rate": {"exact": n / min(t_exact["s"], t_exact2["s"]), "draft": n / min(t_fast["s"], t_fast2["s"])},
            "diff_mean": float(diff.mean()), "diff_p99": float(np.percentile(diff, 99)), "diff_max": int(diff.max())}


def w_trivial(p: dict) -> dict:
    """E: the orchestration floor, three tasks that return numbers."""
    from prefect import flow, task

    @task
    def one() -> int: return 1  # noqa: E704

    @task
    def add(a: int, b: int) -> int: return a + b  # noqa: E704

    @flow(name="bench-trivial")
    def trivial() -> int: return add(one(), one())  # noqa: E704
    return {"value": trivial()}


WORKERS = {"extract": w_extract, "seed": w_seed, "steps": w_steps, "decode": w_decode, "step": w_step,
           "trivial": w_trivial, "jpeg": w_jpeg, "limits": w_limits}


# ---------------------------------------------------------------- subprocesses
def spawn(cmd: list, log: Path, env: dict | None = None) -> dict:
    """Run to completion: wall and CPU seconds, and peak RSS of its largest process (from wait4)."""
    t = time.perf_counter()
    with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall": time.perf_counter() - t, "cpu": ru.ru_utime + ru.ru_stime,
            "rss_mb": ru.ru_maxrss / 1024, "out": Path(f"{log}.out").read_text(),
            "err": Path(f"{log}.err").read_text()}


def last_line(text: str) -> str:
    """The exception line of a traceback (else the last line), safe inside a Markdown table cell."""
    lines = text.strip().splitlines() or [""]
    line = next((ln for ln in reversed(lines) if re.match(r"[\w.]*(Error|Exception)\b", ln)), lines[-1])
    return line[:300].replace("|", "/")


def worker(name: str, payload: dict, log: Path, env: dict | None = None) -> tuple[dict, dict]:
    Path(f"{log}.in.json").write_text(json.dumps(payload))
    p = spawn([sys.executable, "-m", "bench.run", "--worker", name, f"{log}.in.json", f"{log}.res.json"], log, env)
    if p["rc"]:
        raise RuntimeError(f"worker {name} exited {p['rc']}: {last_line(p['err'])} (see {log}.err)")
    return json.loads(Path(f"{log}.res.json").read_text()), p


def prefect_env(home: Path, api: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PIXELSIM_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "results"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_COLORS="false")
    return {**env, "PREFECT_API_URL": api} if api else env


# ---------------------------------------------------------------- synthetic data (G)
def synthetic_tar(path: Path, n: int, extra: int = 0) -> None:
    """n MNIST-like 28x28 PNGs in synth/{train,valid}/{0..9}/ (5/6 train), from 300 distinct images;
    `extra` more under new names (the archive grown: the same n members, byte for byte, plus these)."""
    import numpy as np
    from pixelsim.storage.images import encode_png
    rng = np.random.default_rng(0)

    def png(c: int) -> bytes:  # sparse noise plus a bright bar whose position is the class
        img = ((rng.random((28, 28)) < 0.08) * rng.integers(0, 256, (28, 28))).astype(np.uint8)
        img[4:24, 2 + 2 * c:8 + 2 * c] = rng.integers(100, 256, (20, 6))
        return encode_png(img)
    pngs = {c: [png(c) for _ in range(30)] for c in range(10)}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            data = pngs[i % 10][(i // 10) % 30]
            ti = tarfile.TarInfo(f"synth/{'train' if i < n * 5 // 6 else 'valid'}/{i % 10}/{i:07d}.png")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for j in range(extra):
            data = pngs[j % 10][(j // 10 + 7) % 30]
            ti = tarfile.TarInfo(f"synth/{'train' if j < extra * 5 // 6 else 'valid'}/{j % 10}/{j:07d}b.png")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def scale(n: int, tmp: Path, logs: Path) -> dict:
    from pixelsim.tasks.download import download_archive
    root = tmp / f"scale-{n}"
    tar = tmp / f"synthetic-{n}.tar"
    _, gen = timed(synthetic_tar, tar, n)
    state = {"root": str(root), "archive": download_archive(str(tar), str(root)).value.dir}
    tar.unlink()
    images = {"untar": n, "convert": n, "templates": n * 5 // 6, "evaluate": n - n * 5 // 6}
    result = {"images": n, "generate_s": gen["s"], "steps": {}}

    def step(name: str, key: str | None, label: str, count: int) -> dict:
        res, proc = worker("step", {**state, "step": name}, logs / f"scale-{n}-{label}")
        if key:
            state[key] = res["out"]
        result["steps"][label] = {"s": res["s"], "wall": proc["wall"], "cores": res["cpu"] / res["s"],
                                  "rate": count / res["s"], "rss_mb": res["peak_rss_mb"] + res.get("workers_rss_mb", 0.0),
                                  "layout_s": res.get("layout_s")}
        return res

    try:
        for name, key in (("untar", "tree"), ("convert", "shards"), ("templates", "templates"), ("evaluate", None)):
            step(name, key, name, images[name])
        lim = result["limits"] = worker("limits", state, logs / f"scale-{n}-limits")[0]
        cores = lim["cores"]
        result["limit_s"] = {"untar": n / lim["hash"], "convert": n / (cores * lim["decode"]) + n / (cores * lim["hash"]),
                             "templates": lim["templates_s"], "evaluate": lim["evaluate_s"]}
        extra = n // 100   # the incremental case: the same archive grown by 1%
        grown = tmp / f"synthetic-{n}-grown.tar"
        synthetic_tar(grown, n, extra)
        state["archive"] = download_archive(str(grown), str(root)).value.dir
        grown.unlink()
        step("untar", "tree", "untar, grown 1%", n + extra)
        res = step("convert", "shards", "convert, grown 1% (incremental)", n + extra)
        result["incremental"] = {"images": n + extra, "decoded": n + extra - res["reused_images"]}
    except Exception as e:  # noqa: BLE001 - keep what was measured
        result["error"] = f"N={n:,}: {type(e).__name__}: {e}"[:500]
    finally:
        t = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        result["cleanup_s"] = time.perf_counter() - t
    return result


# ---------------------------------------------------------------- the benchmark
def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    versions = {p: next((d.version for d in md.distributions(name=p)), None)
                for p in ("torch", "prefect", "pyarrow", "pillow", "numpy", "pyspng")}
    return {"cpus": os.cpu_count(), "model": model, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), **versions}


def run_pixelsim(mode: str, data: Path, tmp: Path, logs: Path) -> dict:
    """C (cold), D (warm) and E (floor, best of 2) as the README's `pixelsim run` does them, on a
    fresh PREFECT_HOME. [pixelsim]: the default, pixelsim's own background server, started by the
    first run (C0, not in C/D/E) and stopped at the end; [temporary]: PIXELSIM_SERVER=temporary,
    Prefect's temporary server in every run."""
    home, root = tmp / f"prefect-{mode}", tmp / f"root-{mode}"
    home.mkdir(parents=True)
    cmd = lambda r: [BIN / "pixelsim", "run", "--source", data, "--root", r, "--json"]  # noqa: E731
    env = prefect_env(home)
    if mode == "temporary":
        env["PIXELSIM_SERVER"] = "temporary"
    runs, startup, api = {}, None, None
    try:
        if mode == "pixelsim":
            runs["C0"] = spawn(cmd(tmp / f"root-{mode}-first"), logs / f"C0-{mode}", env)
            state = json.loads((home / "pixelsim-server.json").read_text())
            api = state["api"]
            startup = runs["C0"]["wall"]
        n = REPEAT if mode == "pixelsim" else 1    # a temporary server costs 10-20 s a run
        for i in range(n):    # cold: a fresh root each time
            runs[f"C{i}"] = spawn(cmd(tmp / f"root-{mode}-cold{i}" if i else root), logs / f"C-{mode}-{i}", env)
        for i in range(n):
            runs[f"D{i}"] = spawn(cmd(root), logs / f"D-{mode}-{i}", env)
        for k in ("C", "D"):   # the median run stands for the kind; every run's time is kept
            times = sorted((p["wall"], key) for key, p in runs.items() if re.fullmatch(rf"{k}\d+", key))
            runs[k] = runs[times[len(times) // 2][1]]
        trivial = [sys.executable, "-m", "bench.run", "--worker", "trivial", "-", os.devnull]
        runs.update({f"E{i}": spawn(trivial, logs / f"E-{mode}-{i}", {**env, "PREFECT_API_URL": api} if api else env)
                     for i in range(2)})
    finally:
        if mode == "pixelsim":
            spawn([BIN / "pixelsim", "server", "stop"], logs / f"stop-{mode}", env)
    wall = {k: None if p["rc"] else p["wall"] for k, p in runs.items()}  # a failed command is reported, not timed
    reused = re.findall(r"reused cached results for \d+ of \d+ steps", runs["D"]["err"])
    return {"server_start_s": startup, "C": wall["C"], "D": wall["D"], "E_runs": [wall["E0"], wall["E1"]],
            "C_runs": [w for k, w in wall.items() if re.fullmatch(r"C\d+", k)],
            "D_runs": [w for k, w in wall.items() if re.fullmatch(r"D\d+", k)],
            "E": min((w for w in (wall["E0"], wall["E1"]) if w is not None), default=None),
            "C_rss_mb": runs["C"]["rss_mb"], "D_cached": reused[-1] if reused else "no cache line in the log",
            "failed": {k: f"{k} exited {p['rc']}: {last_line(p['err'])}" for k, p in runs.items()
                       if p["rc"] and k not in ("C", "D")},
            "accuracy": {} if wall["C"] is None else
            {m: v["per_class"] for m, v in json.loads(runs["C"]["out"])["report"]["metrics"].items()}}


def section(results: dict, key: str, fn, *args):
    t = time.perf_counter()
    try:
        results[key] = fn(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it never stops at a failure
        results[key] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{key}] failed: {e}", file=sys.stderr)
    print(f"[{key}] done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return results[key]


def fmt(x, unit=""):
    spec = ",.0f" if x is None or abs(x) >= 1000 else ".3g" if abs(x) < 10 else ".1f"
    return "—" if x is None else f"{x:{spec}}{unit}"


def runs_text(times: list | None) -> str:
    return ", ".join(fmt(t, " s") for t in times or [])


def table(R: dict) -> str:
    rows: list[tuple] = []

    def row(sec, what, val, unit="s", vs=None, vs_val=None, label="÷", inverse=False):
        ok = isinstance(val, (int, float)) and isinstance(vs_val, (int, float)) and vs_val and val
        ratio = ((vs_val / val) if inverse else (val / vs_val)) if ok else None
        rows.append((sec, what, fmt(val, " " + unit), vs or "—", f"{label} {ratio:.2f}" if ratio else "—"))
    A, B, F = R.get("A", {}), R.get("B", {}), R.get("F", {})
    st = B.get("steps", {})
    b_all = B.get("total", {}).get("s") if st else None
    b_tree = sum(st[k]["s"] for k in ("convert", "templates", "evaluate")) if st else None
    a_all = A["s"] + R["A0"]["s"] if "s" in A and "s" in R.get("A0", {}) else None
    row("A", "seed script, loading part (PIL open, stack, /255)", A.get("load_s"), "s", "B convert",
        st.get("convert", {}).get("s"), "A/B")
    row("A", "seed extraction (tarfile.extractall, one file per image)", R.get("A0", {}).get("s"), "s",
        "B untar", st.get("untar", {}).get("s"), "A/B")
    seed = f"A seed script from the extracted tree ({fmt(A.get('s'), ' s')})"
    seed_all = f"A seed extraction + script ({fmt(a_all, ' s')})"
    seed_proc = (f"A seed script as a process, imports included ({fmt(A.get('process_s'), ' s')}"
                 + (f": median of {runs_text(A.get('process_runs'))})" if A.get("process_runs") else ")"))
    row("B", "all steps (download → report)", b_all, "s", seed_all, a_all, "A/B", inverse=True)
    row("B", "all steps (download → report)", b_all, "s", seed, A.get("s"), "A/B", inverse=True)
    row("B", "from the unpacked archive (convert incl. layout, templates, evaluate)", b_tree, "s", seed, A.get("s"),
        "A/B", True)
    for k, s in st.items():
        row("B", f"step {k} (cores used {s['cpu'] / s['s']:.2f})", s["s"], "s", "B all steps", b_all, "share")
    for mode in MODES:
        m = R.get(f"C-{mode}", {})
        if "error" in m or not m:
            rows.append(("C/D/E", f"[{mode}] failed: {m.get('error', 'not run')}", "—", "—", "—"))
            continue
        many = lambda k: (f" (median of {runs_text(m.get(f'{k}_runs'))})"  # noqa: E731
                          if len(m.get(f"{k}_runs") or []) > 1 else "")
        row("C", f"pixelsim run, cold [{mode}]{many('C')}", m["C"], "s", "B all steps", b_all, "C/B")
        row("C", f"pixelsim run, cold [{mode}]", m["C"], "s", seed_proc, A.get("process_s"), "C/A")
        row("D", f"pixelsim run, warm [{mode}] ({m['D_cached']}){many('D')}", m["D"], "s", "C cold", m["C"], "D/C")
        row("D", f"pixelsim run, warm [{mode}]", m["D"], "s", seed_proc, A.get("process_s"), "D/A")
        row("E", f"trivial 3-task flow, best of 2 [{mode}]", m["E"], "s", "C cold", m["C"], "E/C")
        for k in ("C", "D"):
            over = m[k] - m["E"] if None not in (m[k], m["E"]) else None
            row(f"{k}-E", f"pixelsim overhead {'cold' if k == 'C' else 'warm'} [{mode}]", over, "s", "B all steps",
                b_all, f"({k}-E)/B")
        if None not in (m["C"], m["E"], b_all):
            row("C-E-B", f"cold run beyond the floor and the work [{mode}] (imports of torch, pandas; task runs)",
                m["C"] - m["E"] - b_all, "s", "E trivial flow", m["E"])
        rows.extend(("!", f"[{mode}] {err}", "failed", "—", "—") for err in m.get("failed", {}).values())
        if m["server_start_s"]:
            row("C0", f"first run ever: starts pixelsim's server, cold (not in C/D/E) [{mode}]", m["server_start_s"],
                "s", seed_proc, A.get("process_s"), "C0/A")
    rate, fast = F.get("rate", {}), F.get("fastest", "fastest")
    for what, k, vs, vk in (("train images: shards → one array, best of 3", "shards", f"{fast} read+decode", "fastest"),
                            ("the same, first call in the process", "shards_first", "best of 3", "shards"),
                            (f"{fast} read+decode of the same PNG files", "fastest", "Pillow read+decode", "pillow"),
                            ("Pillow read+decode of the same PNG files", "pillow", "shards, best of 3", "shards")):
        row("F", what, rate.get(k), "img/s", vs, rate.get(vk))
    row("dec", f"single-core storage.images.decode ({F.get('decoder')}, CRC-checked, in memory)",
        rate.get("decode"), "img/s", f"bare {fast} in memory", rate.get("raw"), "÷")
    J = R.get("J", {})
    if "rate" in J:
        row("J", f"{J['images']} JPEGs of 240-640 px → 28x28, reduced-scale decode + resize (default), best of 2",
            J["rate"]["draft"], "img/s", "full decode + resize (--exact-resize)", J["rate"]["exact"])
        rows.append(("J", "pixel difference from the full decode (0-255)",
                     f"mean {J['diff_mean']:.2f}, p99 {J['diff_p99']:.0f}, max {J['diff_max']}", "—", "—"))
    cv = st.get("convert")
    if cv and rate.get("decode"):
        n, cores = sum(sum(c.values()) for c in B["shards"]["counts"].values()), cv["cpu"] / cv["s"]
        for what, k in ((f"cores used {cores:.2f}", cores), (f"all {R['machine']['cpus']} cores", R["machine"]["cpus"])):
            row("dec", "B convert throughput", n / cv["s"], "img/s", f"{what} × decode rate", k * rate["decode"])
    out = ["| section | what | value | compared with | ratio |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    out += ["", "| metric | class | A seed | B pixelsim | " + " | ".join(f"C {m}" for m in MODES) + " |",
            "|---|---|---|---|---|---|"]
    for metric, per in A.get("accuracy", {}).items():
        for c, a in per.items():
            cs = [R.get(f"C-{m}", {}).get("accuracy", {}).get(metric, {}).get(c) for m in MODES]
            out.append(f"| {metric} | {c} | {a:.4f} | {B['accuracy'][metric][c]:.4f} | "
                       f"{cs[0] or '—'} | {cs[1] or '—'} |")
    out.append(f"\nA equals pixelsim (B, exact): **{R.get('accuracy_equal')}**; A rounded to 4 places equals "
               f"the C reports: **{R.get('accuracy_equal_C')}**; shard pixels equal the decoded PNGs: "
               f"**{F.get('same_pixels')}**")
    G = R.get("G")
    if G:
        out += ["", "| N | step | seconds (work) | process wall | images/s | cores used | limit s | ÷ limit "
                "| peak RSS MB | RSS vs smallest N |", "|---|---|---|---|---|---|---|---|---|---|"]
        runs = [g for g in G.get("runs", []) if "steps" in g]
        for g in runs:
            for k, s in g["steps"].items():
                base = runs[0]["steps"].get(k, {}).get("rss_mb")
                ratio = f"÷ {s['rss_mb'] / base:.2f}" if base else "—"
                extra = f" (+ find_layout {s['layout_s']:.1f}s)" if s.get("layout_s") is not None else ""
                limit = g.get("limit_s", {}).get(k)
                lim = f"{limit:.1f} | ÷ {s['s'] / limit:.2f}" if limit else "— | —"
                out.append(f"| {g['images']:,} | {k}{extra} | {s['s']:.1f} | {s['wall']:.1f} | {s['rate']:,.0f} | "
                           f"{s['cores']:.2f} | {lim} | {s['rss_mb']:.0f} | {ratio} |")
            if g.get("incremental"):
                inc = g["incremental"]
                out.append(f"| {g['images']:,} | grown 1%: images decoded again | {inc['decoded']:,} of "
                           f"{inc['images']:,} ({inc['decoded'] / inc['images']:.1%}) | | | | | | | |")
        full = [sum(s["s"] for k, s in g["steps"].items() if k in ("untar", "convert", "templates", "evaluate"))
                for g in runs]
        notes = G.get("notes", []) + [g["error"] for g in G.get("runs", []) if "error" in g]
        notes += [f"N={g['images']:,}: archive → evaluated, the four steps {t:.1f}s; limits measured in this run: "
                  f"sha256 {g['limits']['hash']:,.0f} members/s, bare decode {g['limits']['decode']:,.0f} img/s per "
                  f"core (untar's limit: sha256 of every member on one core; convert's: bare decode + sha256 on every core; templates' and evaluate's: a plain single-threaded numpy script over the same shards)"
                  for g, t in zip(runs, full) if g.get("limits")]
        notes += [f"N={g['images']:,}: generating the tar {g['generate_s']:.0f}s, deleting the root "
                  f"{g['cleanup_s']:.0f}s (not in the steps)" for g in runs]
        out.append(f"\ntemplates/evaluate peak RSS flat across N (within 1.25x): **{G.get('flat')}**\n"
                   + "".join(f"\n- {e}" for e in notes))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "flows/data/mnist_sample.tgz")
    ap.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", type=Path, default=REPO / "bench/out")
    ap.add_argument("--skip-scale", action="store_true", help="skip G, the synthetic scale run")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        name, src, dst = a.worker
        out = WORKERS[name](json.loads(Path(src).read_text()) if src != "-" else {})
        Path(dst).write_text(json.dumps({**out, "peak_rss_mb": peak_rss_mb()} if isinstance(out, dict) else out))
        from pixelsim.flows.cli import exit_now
        exit_now(0)   # as the pixelsim program ends: no native thread-pool teardown, whose rare abort failed a worker
        return 0
    t0, out, data = time.perf_counter(), a.out.resolve(), a.data.resolve()
    tmp, logs = out / "tmp", out / "logs"
    for d in (tmp, logs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    R: dict = {"machine": machine(), "data": str(data), "command": " ".join(sys.argv), "load_start": os.getloadavg()}
    try:
        root = tmp / "root-B"
        B = section(R, "B", lambda: worker("steps", {"data": str(data), "root": str(root)}, logs / "B")[0])
        if "error" not in B:
            tree = tmp / "seed-tree"
            section(R, "A0", lambda: worker("extract", {"data": str(data), "dest": str(tree)}, logs / "A0")[0])
            base = tree / B["layout_base"]
            def seed() -> dict:   # the median of REPEAT whole processes: the ratios' denominator
                got = [worker("seed", {"base": str(base)}, logs / f"A{i}") for i in range(REPEAT)]
                return {**got[0][0], "process_s": median([p["wall"] for _, p in got]),
                        "process_runs": [p["wall"] for _, p in got]}
            A = section(R, "A", seed)
            R["accuracy_equal"] = A.get("accuracy") == B["accuracy"]
            section(R, "F", lambda: worker("decode", {"root": str(root), "seed_tree": str(tree), **B}, logs / "F")[0])
        section(R, "J", lambda: worker("jpeg", {"n": 600}, logs / "J")[0])
        for mode in MODES:
            section(R, f"C-{mode}", run_pixelsim, mode, data, tmp, logs)
        R["accuracy_equal_C"] = {m: all(round(v, 4) == R[f"C-{m}"]["accuracy"][metric][c] for metric, per
                                        in R.get("A", {}).get("accuracy", {}).items() for c, v in per.items())
                                 for m in MODES if R[f"C-{m}"].get("accuracy")}
        if not a.skip_scale:
            G = R["G"] = {"runs": [], "notes": []}
            t_g = time.perf_counter()
            for n in sorted(a.images):
                if time.perf_counter() - t_g > 15 * 60:
                    G["notes"].append(f"N={n:,} skipped: the scale section passed 15 minutes")
                    break
                G["runs"].append(section({}, f"G N={n:,}", scale, n, tmp, logs))
            rss = [[g["steps"].get(k, {}).get("rss_mb") for g in G["runs"]] for k in ("templates", "evaluate")]
            G["flat"] = all(len(r) > 1 and None not in r and r[-1] <= 1.25 * r[0] for r in rss)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        R["wall_s"], R["load_end"] = time.perf_counter() - t0, os.getloadavg()
        text = table(R)
        m = R["machine"]
        head = (f"pixelsim benchmark, {m['date']}: {m['cpus']} CPUs ({m['model']}), Python {m['python']}, "
                f"torch {m['torch']}, prefect {m['prefect']}, pyarrow {m['pyarrow']}, pyspng {m['pyspng']}, "
                f"decoder {R.get('F', {}).get('decoder')}; data {data.name}; benchmark wall {R['wall_s']:.0f}s; "
                f"load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in R['load_start'])}, "
                f"at end {'/'.join(f'{x:.1f}' for x in R['load_end'])}\n")
        print(head + "\n" + text)
        (out / "results.json").write_text(json.dumps(R, indent=1, default=str))
        (out / "results.md").write_text(head + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
