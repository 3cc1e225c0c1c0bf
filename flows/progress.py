"""Progress bars for download and convert when stderr is a terminal; nothing otherwise.

The steps run as Prefect tasks, which cannot take a callback (arguments are pickled and
hashed into cache keys), so the CLI installs module-level hooks instead: `storage.fetch`'s
for download bytes, and `notify` here, which the flow calls as convert shards finish.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

_bar: "Bars | None" = None


def notify(step: str, done: int, total: int | None) -> None:
    """Report `done` of `total` units of `step`; a no-op unless a bar is on screen."""
    if _bar is not None:
        _bar.update(step, done, total)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Bars:
    """One rich progress line per step, drawn on stderr below the log lines."""

    UNITS = {"download": "bytes", "convert": "shards"}

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description:<9}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                                 console=self.console, refresh_per_second=8)
        self.ids: dict[str, Any] = {}

    def update(self, step: str, done: int, total: int | None) -> None:
        if self.UNITS.get(step) == "bytes":
            count = f"{_size(done)}" + (f" / {_size(total)}" if total else "")
        else:
            count = f"{done}/{total} {self.UNITS.get(step, '')}".rstrip()
        if step not in self.ids:
            self.ids[step] = self.progress.add_task(step, total=total, count=count)
        self.progress.update(self.ids[step], completed=done, total=total, count=count)


def _console_handlers() -> list[logging.Handler]:
    """Prefect's rich log handlers, which hold their own console on stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *list(logging.root.manager.loggerDict.values())]
    return [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers
            if isinstance(h, PrefectConsoleHandler)]


@contextlib.contextmanager
def terminal_progress(enabled: bool) -> Iterator[None]:
    """Show bars while the block runs when `enabled` (stderr is a TTY); log lines print above them."""
    global _bar
    if not enabled:
        yield
        return
    import pixelsim.storage.fetch as fetch

    bars = Bars()
    # Prefect's handlers must print through the bars' console, or they would tear the bar apart
    handlers = [(h, h.console) for h in _console_handlers()]
    previous = fetch.progress_hook
    with bars.progress:
        for h, _ in handlers:
            h.console = bars.console
        fetch.progress_hook = lambda done, total: bars.update("download", done, total)
        _bar = bars
        try:
            yield
        finally:
            _bar = None
            fetch.progress_hook = previous
            for h, console in handlers:
                h.console = console
