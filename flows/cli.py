"""`pixelsim`: run the flow from a terminal or a scheduler; logs on stderr, results on stdout."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from pixelsim.storage.errors import OptionError, shown
from pixelsim.tasks.contracts import DEFAULT_ROOT, METRICS, Options, default_root


def _quiet_prefect_defaults() -> None:
    """Offline-friendly defaults a user can still override from the environment."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # a first temporary server migrates a new database: 20 s is too short on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _size(text: str) -> list[int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 28x28, got {text!r}") from None
    return [h, w]


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def _workers(text: str) -> int:
    """At most 4 per core: a local dask cluster starts every worker process at once (about
    100 MB each), so a typo's thousands would exhaust memory before any work."""
    n, most = _positive(text), 4 * (os.cpu_count() or 1)
    if n > most:
        raise argparse.ArgumentTypeError(f"{n} is more than 4 per core on this machine ({most}); "
                                         "a cluster of your own takes --dask-address")
    return n


def _deployment_name(text: str) -> str:
    """Prefect names a deployment <flow>/<name>: a slash in the name cannot be looked up again."""
    name = text.strip()
    if not name or "/" in name or not name.isprintable() or len(name) > 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a deployment name is 1 to 100 printable characters, no '/'")
    return name


def _port(text: str) -> int:
    n = _positive(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 1 to 65535, got {text!r}")
    return n


def _dask_address(address: str) -> None:
    """A scheduler address distributed can parse, checked before the flow starts."""
    try:
        from distributed.comm.addressing import parse_address, parse_host_port
    except ImportError:
        return   # task_runner says which extra to install
    try:
        parse_host_port(parse_address(address)[1])
    except (ValueError, TypeError) as e:
        raise OptionError(f"--dask-address {address!r}: {e}; expected host:port or tcp://host:port") from None


class Parser(argparse.ArgumentParser):
    """argparse, suggesting the closest option for a mistyped one."""

    def error(self, message: str):
        import difflib
        import re

        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice and (close := difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1)):
            message += f" (did you mean {close[0]}?)"
        bad = re.findall(r"unrecognized arguments: (.*)", message)
        if bad:
            parsers, known = [self], []
            while parsers:
                here = parsers.pop()
                for a in here._actions:
                    known += a.option_strings
                    if isinstance(a, argparse._SubParsersAction):
                        parsers += list(a.choices.values())
            for word in bad[0].split():
                if word.startswith("-") and (close := difflib.get_close_matches(word.split("=")[0], known, n=1)):
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


EPILOG = """examples:
  pixelsim run                                      mnist_sample (official URL, else the bundled copy)
  pixelsim run --dataset mnist_tiny --metric rmse
  pixelsim run --source https://host/data.tgz --sha256 HEX --resize 28x28
  pixelsim run --source ./my-images/ --dataset mine --classes cat,dog
  pixelsim server start                             a background Prefect server for every later run

environment:
  PIXELSIM_ROOT           default --root (./pixelsim-data)
  PIXELSIM_OFFLINE=1      as --offline (1/0, true/false, yes/no, on/off)
  PIXELSIM_URL_<DATASET>  a mirror of a named dataset's official URL
  PIXELSIM_DECODE_WORKERS size of convert's process pool (0: decode in place)
  PIXELSIM_LOCK_DIR       where step locks live for an object-store root
  PIXELSIM_SERVER         auto (default: pixelsim's background Prefect server) or temporary
  PIXELSIM_MAX_DOWNLOAD_BYTES  ceiling for a source without a pinned size (default 20 GiB)
  PIXELSIM_SHARD_BYTES    pixel bytes per shard, at most (default 256 MiB)
  PIXELSIM_MAX_MEMORY     a run's peak memory by the formula of tasks/bounds.py (default half of RAM)
  PREFECT_API_URL         a Prefect server to report to (else pixelsim's own, else a temporary one)
"""


def _cron(text: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule
    try:
        CronSchedule(cron=text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a cron expression: {text!r} (e.g. '0 2 * * *')") from None
    return text


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("pixelsim")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from pixelsim import __version__
        return __version__


def run_options(run: argparse.ArgumentParser) -> None:
    """The flow's options, shared by `run` and `serve`."""
    run.add_argument("--dataset", help="a named dataset (see `pixelsim datasets`; default mnist_sample) or, "
                     "with --source, the name its outputs are filed under (default: the source's file name)")
    run.add_argument("--source", help="archive URL or path (any fsspec URL); never falls back")
    run.add_argument("--sha256", help="expected sha256 of the --source archive (verified before extraction)")
    run.add_argument("--root", default=default_root(),
                     help=f"storage root, a folder or fsspec URL (default: ./{DEFAULT_ROOT} or $PIXELSIM_ROOT)")
    run.add_argument("--metric", choices=METRICS, default=Options.metric, help="headline distance (both are computed)")
    run.add_argument("--refresh", action="store_true", help="recompute every step, ignoring cached results "
                     "(and ask a named dataset's official URL again)")
    run.add_argument("--offline", action="store_true", help="never touch the network (also $PIXELSIM_OFFLINE=1): "
                     "use what the root holds, or a named dataset's bundled copy")
    run.add_argument("--shard-size", type=int, default=Options.shard_size, help="images per Parquet shard")
    run.add_argument("--channels", type=int, choices=[1, 3], default=Options.channels,
                     help="1: grayscale (luma), 3: RGB")
    run.add_argument("--resize", type=_size, help="resize every image to HxW instead of failing on mixed sizes "
                     "(JPEGs decode at a reduced scale first where libjpeg can: faster, pixels within a few levels)")
    run.add_argument("--exact-resize", action="store_true", help="with --resize, decode every JPEG at full size "
                     "before resizing (slower; the pixels of a full decode)")
    run.add_argument("--classes", help="comma-separated subset of class folders, e.g. 3,7")
    run.add_argument("--train-split", help="name of the training split folder")
    run.add_argument("--valid-split", help="name of the validation split folder")
    run.add_argument("--device", default=Options.device, help="torch device for templates and evaluation")
    run.add_argument("--skip-bad", type=int, default=Options.skip_bad, metavar="N",
                     help="leave out at most N unreadable images (listed in the report) instead of failing")
    run.add_argument("--task-runner", choices=["thread", "process", "dask"], default="thread",
                     help="where mapped steps (convert, evaluate) run")
    run.add_argument("--workers", type=_workers,
                     help="parallel workers for the task runner (default: CPU count; at most 4 per core)")
    run.add_argument("--dask-address", help="scheduler address of an existing Dask cluster (with --task-runner dask)")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="pixelsim", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"pixelsim {version()}")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error, not only its line")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = type("Formatter", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    run = sub.add_parser("run", help="run the pixel-similarity flow", epilog=EPILOG, formatter_class=fmt)
    run_options(run)
    run.add_argument("--json", action="store_true", help="print the run as JSON on stdout: run_id, record, cached, "
                     "seconds, report_dir and report (the report JSON)")
    serve = sub.add_parser("serve", help="serve the flow on a cron schedule from this process "
                           "(needs a Prefect server: PREFECT_API_URL)", formatter_class=fmt)
    serve.add_argument("--cron", type=_cron, required=True, help="when to run, in UTC, e.g. '0 2 * * *'")
    serve.add_argument("--name", type=_deployment_name, help="deployment name (default: the dataset's name)")
    run_options(serve)
    datasets = sub.add_parser("datasets", help="list the named datasets, and which work offline")
    datasets.add_argument("--root", default=default_root(), help="storage root to look in")
    server = sub.add_parser("server", help="a local Prefect server in the background, used by every later run "
                            "without PREFECT_API_URL instead of a temporary one")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument("--port", type=_port, help=f"port on 127.0.0.1 (default {4200}, else a free one)")
    show = sub.add_parser("show", help="a past run's summary, from the stored files (no Prefect needed)")
    show.add_argument("run", nargs="?", help="a run id (or a unique prefix) or a report folder; default: the latest run")
    show.add_argument("--root", default=default_root(),
                      help=f"storage root holding history/ (default: ./{DEFAULT_ROOT} or $PIXELSIM_ROOT)")
    show.add_argument("--json", action="store_true", help="print the run and its report as JSON")
    runs = sub.add_parser("runs", help="the run history, newest first, from the stored files (no Prefect needed)")
    runs.add_argument("--root", default=default_root(), help="storage root holding history/")
    runs.add_argument("--dataset", help="only this dataset's runs")
    runs.add_argument("--last", type=_positive, default=20, help="how many runs (default 20)")
    runs.add_argument("--json", action="store_true", help="print the rows as JSON")
    diff = sub.add_parser("diff", help="what changed between two runs: accuracy per class, the source archive "
                          "(members added, removed, changed), the parameters")
    diff.add_argument("runs", nargs="*", metavar="RUN", help="two run ids (or unique prefixes); one: that run against "
                      "its dataset's run before it; none: the latest run against the one before it")
    diff.add_argument("--root", default=default_root(), help="storage root holding history/")
    diff.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Every failure ends in one line `pixelsim: error: ...` (exit 1; 2 for a bad option), with
    the traceback only under --verbose; Ctrl-C and a closed pipe end quietly."""
    if argv is not None:   # a caller in a longer-lived process (tests, scripts)
        return _main(argv)
    try:
        code = _main(None)
    except SystemExit as e:   # argparse's --help, --version and usage errors
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    exit_now(code)
    return code   # not reached


def exit_now(code: int) -> None:
    """End the program the way the interpreter would, minus its teardown: wait for threads, run
    the atexit handlers (Prefect's log and event flushes, the process pool's shutdown), flush,
    then `os._exit`. The teardown's garbage collections walked every object Prefect and torch
    made (1 s a run here), and tearing down native thread pools at exit is a known source of
    rare aborts ("terminate called without an active exception", SIGABRT, seen here once in
    about 20 runs of the plain pipeline) and hangs (apache/arrow#34314, #50482)."""
    import atexit
    import threading

    try:
        threading._shutdown()   # what the interpreter does first: join the non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):   # a closed pipe or stream: nothing more to say
                pass
        os._exit(code)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    from pixelsim.storage.errors import PixelsimError

    try:
        return command(args)
    except KeyboardInterrupt:
        print("pixelsim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # the reader went away (`pixelsim show --json | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PixelsimError, OSError) as e:
        return fail(args, error_line(e), 2 if isinstance(e, OptionError) else 1)
    except Exception as e:
        from pixelsim.storage.errors import backend_failure, first_line
        if (cause := backend_failure(e)) is not None:   # the root's object store, mid-run or in show/runs/diff
            from pixelsim.storage.fetch import redact
            return fail(args, f"the storage root {redact(args.root) if getattr(args, 'root', None) else ''} refused: "
                              f"{first_line(cause)} (check its credentials and bucket)")
        if not api_failure(e):
            raise
        return fail(args, f"the Prefect API at {os.environ.get('PREFECT_API_URL', '?')} stopped answering "
                          f"({first_line(e)}); what the run published in the storage root is kept, and a rerun reuses it")


def fail(args: argparse.Namespace, line: str, code: int = 1) -> int:
    """One line on stderr (the traceback too under --verbose); the exit status."""
    if args.verbose:
        import traceback
        traceback.print_exc()
    print(f"pixelsim: error: {line}", file=sys.stderr)
    return code


def api_failure(e: BaseException) -> bool:
    """Whether an error (or one that caused it) is the Prefect API not answering: its HTTP
    client's errors, or Prefect's own "Failed to reach API"."""
    from pixelsim.storage.errors import caused_by
    return caused_by(e, lambda x: type(x).__module__.split(".")[0] in ("httpx", "httpcore")
                     or "Failed to reach API" in str(x)) is not None


def server_command(action: str, port: int | None) -> int:
    from pixelsim.flows import server

    if action == "start":
        state, started = server.start(port)
        if started:
            server.watch_crashes(state["api"])
        print(f"Prefect server {'started' if started else 'already running'} in the background: UI at {state['ui']}, "
              f"API {state['api']} (log: {state['log']}).\nEvery `pixelsim run` without PREFECT_API_URL now uses it; "
              "stop it with `pixelsim server stop`.")
        return 0
    if action == "stop":
        print("stopped the Prefect server" if server.stop() else "no Prefect server started by pixelsim is running")
        return 0
    state = server.running()
    print(f"running: UI at {state['ui']}, API {state['api']}" if state else "not running")
    return 0 if state else 1


def error_line(e: BaseException) -> str:
    """What went wrong and where: an OS error names its file and what to check."""
    if isinstance(e, OSError) and not hasattr(e, "url") and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def quiet_tracebacks() -> None:
    """Prefect logs a failed task with its traceback; the one line at the end says it all."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info, record.exc_text = None, None
            return True

    for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, PrefectConsoleHandler):
                h.addFilter(NoTraceback())


def command(args: argparse.Namespace) -> int:
    from pixelsim.storage.errors import OptionError

    if args.command == "datasets":
        from pixelsim.flows.datasets import DATASETS
        from pixelsim.tasks.download import in_root
        for d in DATASETS.values():
            here = in_root(args.root, d.source_url(), d.pins) or bool(
                d.bundled and in_root(args.root, d.bundled_path(), d.bundled_pins))
            offline = "in the root, no network needed" if here else "bundled copy, works offline" if d.bundled \
                else "needs the network once"
            print(f"{d.name:14} {d.description}\n{'':14} {d.url}  ({offline})")
        return 0
    if args.command == "server":
        return server_command(args.action, args.port)
    if args.command == "show":
        from pixelsim.flows.show import show
        print(show(args.run, args.root, args.json))
        return 0
    if args.command == "runs":
        from pixelsim.flows.compare import list_runs, render_runs
        rows = list_runs(args.root, args.dataset, args.last)
        print(json.dumps(rows, indent=2) if args.json else render_runs(rows, args.root, args.dataset))
        return 0
    if args.command == "diff":
        from pixelsim.flows.compare import diff, render
        if len(args.runs) > 2:
            raise OptionError(f"diff takes at most two runs, got {len(args.runs)}: {' '.join(args.runs)}")
        d = diff(args.root, *args.runs)
        print(json.dumps(d.to_dict(), indent=2) if args.json else render(d))
        return 0
    from pixelsim.tasks.contracts import Request

    classes = args.classes.split(",") if args.classes is not None else None
    params = dict(dataset=args.dataset, source=args.source, root=args.root, metric=args.metric,
                  refresh=args.refresh, shard_size=args.shard_size, channels=args.channels,
                  resize=args.resize, exact_resize=args.exact_resize, classes=classes,
                  train_split=args.train_split,
                  valid_split=args.valid_split, device=args.device,
                  sha256=args.sha256, skip_bad=args.skip_bad, offline=args.offline)
    request = Request.build(**params)   # every option checked before Prefect starts
    from pixelsim.flows.checks import check_request
    from pixelsim.storage.root import Root

    if request.options.device != "cpu":   # torch's import (2 s) is worth it: no failed run for a missing GPU
        from pixelsim.tasks.templates import torch_device
        torch_device(request.options.device)
    check_request(request)
    Root(request.root).ensure()
    params["dataset"], params["sha256"] = request.dataset, request.sha256   # as checked: trimmed, lower case
    if args.dask_address:
        if args.task_runner != "dask":
            raise OptionError("--dask-address needs --task-runner dask")
        _dask_address(args.dask_address)
    from pixelsim.flows import server

    booting = server.use()   # a server started now boots while Prefect and the steps are imported
    _quiet_prefect_defaults()
    from prefect import tags

    from pixelsim.flows.pixel_similarity import masked_source, pixel_similarity, run_tags
    from pixelsim.flows.prefect_runner import prompt_heartbeats, task_runner

    runner = task_runner(args.task_runner, args.workers, args.dask_address)
    gc.freeze()   # the modules just imported live as long as the process: no collection need walk them
    if booting:
        server.wait_ready(booting)
        if booting["started"]:
            server.watch_crashes(booting["api"])
    elif args.command == "run":
        server.temporary()   # a temporary server, if any, that dies with this run (`serve` refuses one)
    if args.command == "serve":
        from pixelsim.flows.serve import serve
        return serve(params, cron=args.cron, name=args.name or request.dataset, task_runner=runner,
                     tags=run_tags(request))
    from pixelsim.flows.progress import terminal_progress
    if not args.verbose:
        quiet_tracebacks()
    with prompt_heartbeats(), terminal_progress(sys.stderr.isatty()), tags(*run_tags(request)):
        out = pixel_similarity.with_options(task_runner=runner)(**{**params, "source": masked_source(args.source)})
    rep = out.report
    if args.json:
        print(json.dumps(out.summary(), indent=2))
        return 0
    reused = [k for k, v in out.cached.items() if v]
    m = rep["metrics"][args.metric]
    print(f"{rep['dataset']}: {len(rep['classes'])} classes, "
          f"{sum(rep['counts']['train'].values())} train / {sum(rep['counts']['valid'].values())} valid images")
    print(f"source: {rep['source']['url']}" + (f" ({rep['source']['note']})" if rep["source"].get("note") else ""))
    for c in rep["classes"]:
        print(f"  {args.metric} accuracy on {shown(c)}: {m['per_class'][c]}")
    print(f"  balanced (mean of classes): {m['balanced']}   overall: {m['overall']}")
    for note in rep["notes"]:   # what the layout left out: the figures hold only for the rest
        print(f"note: {shown(note)}")
    print(f"reused cached results for {len(reused)} of {len(out.cached)} steps"
          + (f": {', '.join(reused)}" if reused else ""))
    print(f"report: {rep['artifacts']['report']}/report.html")
    print(f"run: {out.run_id} (see `pixelsim show {out.run_id[:8]}`; report.html in the report folder)")
    return 0


if __name__ == "__main__":
    main()
