"""Progress a person can watch: per stage, units done of the total, the rate and the time left.

The library never prints: stages announce their units here, and whoever runs the job (the CLI, a flow, a
notebook) installs a :class:`Reporter` with :func:`reporting`. Without one, nothing is reported and nothing
costs. On a terminal the reporter draws a tqdm bar on stderr; elsewhere (schedulers, Prefect logs, files) it
writes a plain line each time another tenth of the stage is done, so a log of a four-hour stage still
says how far it got. Results are counted on the client as Dask futures finish.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from distributed import Client, as_completed

Advance = Callable[[int], None]
_reporter: ContextVar[Reporter | None] = ContextVar("segpipe_progress", default=None)


class Reporter:
    """Bars (terminal) or periodic lines (anything else) on ``stream``, or lines handed to ``write`` (a
    logger's method, e.g. Prefect's run logger); ``say`` for one-off lines."""

    def __init__(self, stream: TextIO = sys.stderr, bars: bool | None = None,
                 write: Callable[[str], None] | None = None) -> None:
        self.stream = stream
        self.write = write
        self.bars = write is None and (stream.isatty() if bars is None else bars)

    def say(self, line: str) -> None:
        if self.write is not None:
            self.write(line)
        else:
            print(f"segpipe: {line}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str, total: int, unit: str, done: int = 0) -> Iterator[Advance]:
        if self.bars:
            from tqdm import tqdm

            columns, lines = _terminal_size(self.stream)
            with tqdm(total=total, initial=done, desc=f"segpipe: {name}", unit=f" {unit}", file=self.stream,
                      ncols=columns, nrows=lines, leave=True) as bar:
                yield bar.update
            return
        t0, state = time.perf_counter(), {"done": done, "tenth": 10 * done // max(total, 1)}

        def advance(n: int) -> None:
            state["done"] += n
            tenth = 10 * state["done"] // max(total, 1)
            if tenth > state["tenth"] or state["done"] >= total:
                state["tenth"] = tenth
                self.say(_line(name, state["done"] - done, state["done"], total, unit, time.perf_counter() - t0))

        yield advance


def _terminal_size(stream: TextIO) -> tuple[int, int]:
    """The size of the terminal ``stream`` writes to; 100 x 20 where it reports none (a fresh pty, some CI
    consoles): tqdm takes zero rows to mean no room for its bar and would draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 100, 20
    return size.columns or 100, size.lines or 20


def _line(name: str, new: int, done: int, total: int, unit: str, seconds: float) -> str:
    rate = new / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    eta = "" if done >= total or left != left else f", about {_duration(left)} left"
    return f"{name} {done}/{total} {unit}s ({100 * done // max(total, 1)}%), {rate:.3g} {unit}s/s{eta}"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Report every stage run inside this block (in this thread or context) to ``reporter``."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def say(line: str) -> None:
    """One line to the reporter, if any (e.g. that a run resumes)."""
    r = _reporter.get()
    if r is not None:
        r.say(line)


@contextmanager
def stage(name: str, total: int, unit: str, done: int = 0) -> Iterator[Advance]:
    """Announce a stage of ``total`` units (``done`` of them finished earlier); yields ``advance(n)``."""
    r = _reporter.get()
    if r is None or total <= 0:
        yield lambda _n: None
        return
    with r.stage(name, total, unit, done) as advance:
        yield advance


def gather(client: Client, futures: Sequence[Any], advance: Advance | None,
           weights: Sequence[int] | None = None) -> list:
    """``client.gather(futures)`` in order, advancing by each future's weight (default 1) as it finishes."""
    if not futures or advance is None:
        return client.gather(list(futures))
    weight = dict(zip((f.key for f in futures), weights or [1] * len(futures), strict=True))
    for f in as_completed(list(futures)):
        if f.status == "error":
            break  # gather below raises the task's own error
        advance(weight[f.key])
    return client.gather(list(futures))


def counted(client: Client, name: str, futures: Sequence[Any], unit: str = "tile") -> list:
    """``client.gather(futures)`` as a stage of its own, a unit per future: passes whose tasks are one tile
    (slab, row) each report like the others instead of going silent for their length."""
    with stage(name, len(futures), unit) as advance:
        return gather(client, futures, advance)
