"""Progress of shard loading and kernel warm-up: a fraction per loading range for the gossip record (the
page and `p2pinfer status` show it) and, when stderr is a terminal, rich progress bars on it.

The engine reports through `Shard.load(..., progress=...)` from its worker thread: stage "load" counts
bytes of weights read (before it, stage "fetch" counts bytes fetched from peers, serve/fetch.py, for a
range this peer has no file of), stage "warm" counts captured step templates (each one's kernels generated and
compiled, or found in the kernel cache). `LoadProgress` keeps the latest report per shard
(model, start, end); readers on the event loop take snapshots.

Bars only on a terminal: with stderr redirected to a file or a pipe nothing is drawn and the log stays
plain lines. While bars are shown, log lines go above them (the root and libp2p log handlers writing to
the same stream are pointed at the live display, then restored), so a log stays readable on screen too.

Wiring (the agent): the ShardHost passes `self.progress.reporter(key)` to Shard.load and forgets the key
when the load ends; `loading()` gossips `self.progress.fraction(key)`; the agent starts
`progress.watch(self.shards.progress)` in its nursery.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import TextIO

ShardKey = tuple[str, int, int]  # (model, start, end)
Stages = dict[str, tuple[int, int]]  # stage -> (done, total)
LOAD_SHARE = 0.5  # of a load's fraction: reading weights is the first half, warming kernels the second
FETCH_SHARE = 0.5  # when a range's weights come from peers first (serve/fetch.py), fetching is half of it
FRACTION_STEP = 0.1  # the gossiped fraction moves in tenths: each change publishes a full record


class LoadProgress:
    """The latest progress report of each shard being loaded. Thread-safe: the engine reports from its
    worker thread, the gossip record and the bars read on the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads: dict[ShardKey, Stages] = {}

    def reporter(self, key: ShardKey) -> Callable[[str, int, int], None]:
        """A `progress` callback for Shard.load of this range (starts the range at 0)."""
        with self._lock:
            self._loads[key] = {}

        def report(stage: str, done: int, total: int) -> None:
            with self._lock:
                stages = self._loads.get(key)
                if stages is not None:
                    stages[stage] = (done, total)

        return report

    def forget(self, key: ShardKey) -> None:
        """The load ended (loaded or failed)."""
        with self._lock:
            self._loads.pop(key, None)

    def snapshot(self) -> dict[ShardKey, Stages]:
        with self._lock:
            return {k: dict(v) for k, v in self._loads.items()}

    def fraction(self, key: ShardKey, step: float = FRACTION_STEP) -> float:
        """How far the load of `key` is, 0..1 (weights LOAD_SHARE, warm-up the rest), rounded down to `step`."""
        with self._lock:
            stages = dict(self._loads.get(key, {}))
        return overall(stages, step)


def overall(stages: Stages, step: float = 0.0) -> float:
    def part(stage: str) -> float:
        done, total = stages.get(stage, (0, 0))
        return min(1.0, done / total) if total > 0 else (1.0 if stage in stages else 0.0)

    f = LOAD_SHARE * part("load") + (1 - LOAD_SHARE) * part("warm")
    if "fetch" in stages:
        f = FETCH_SHARE * part("fetch") + (1 - FETCH_SHARE) * f
    if step > 0:
        f = math.floor(f / step + 1e-9) * step
    return round(min(1.0, max(0.0, f)), 6)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class _AboveBars(io.TextIOBase):
    """A log handler's stream while bars are live: whole lines printed above the bars, never wrapped by rich."""

    def __init__(self, console, original: TextIO) -> None:
        self.console, self.original = console, original
        self._partial = ""

    def write(self, text: str) -> int:
        from rich.text import Text

        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.console.print(Text(line), soft_wrap=True, highlight=False)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.write("\n")

    def isatty(self) -> bool:
        return True


def _log_handlers() -> list[logging.StreamHandler]:
    out = []
    for logger in (logging.getLogger(), logging.getLogger("libp2p")):
        out += [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and h not in out]
    return out


class Bars:
    """Rich bars on a terminal stream: per loading shard one for its weights (MiB read) and one for its
    kernels (step templates captured). `show(snapshot)` brings them in line with a LoadProgress snapshot:
    bars appear with a load and go when it ends (transient: the log's 'loaded ... in N s' line stays).
    On a stream that is not a terminal every call does nothing."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream)
        self._progress = None
        self._tasks: dict[tuple[ShardKey, str], int] = {}
        self._swapped: list[tuple[logging.StreamHandler, TextIO]] = []

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        console = Console(file=self.stream, force_terminal=True, highlight=False)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=self.stream is sys.stderr,
            refresh_per_second=8,
        )
        self._progress.start()
        for h in _log_handlers():
            if h.stream is self.stream:
                self._swapped.append((h, h.stream))
                h.setStream(_AboveBars(console, self.stream))

    def close(self) -> None:
        if self._progress is None:
            return
        for h, original in self._swapped:
            h.setStream(original)
        self._swapped.clear()
        self._progress.stop()
        self._progress = None
        self._tasks.clear()

    def show(self, snapshot: dict[ShardKey, Stages]) -> None:
        if not self.enabled:
            return
        if not snapshot:
            self.close()
            return
        if self._progress is None:
            self._start()
        p = self._progress
        for key, stages in sorted(snapshot.items()):
            model, start, end = key
            for stage, label in (("fetch", "fetch"), ("load", "weights"), ("warm", "kernels")):
                if stage == "fetch" and stage not in stages:
                    continue  # only a range whose weights come from peers has this stage
                done, total = stages.get(stage, (0, 0))
                task = self._tasks.get((key, stage))
                if task is None:
                    task = self._tasks[key, stage] = p.add_task(
                        f"{model} [{start}, {end}) {label:<7}", total=None, amount=""
                    )
                if stage in ("fetch", "load"):
                    amount = f"{done / 2**20:.0f}/{total / 2**20:.0f} MiB" if total else ""
                else:
                    amount = f"{done}/{total} steps" if total else "waiting for weights"
                p.update(task, completed=done, total=total or None, amount=amount)
        for (key, stage), task in list(self._tasks.items()):
            if key not in snapshot:
                p.remove_task(task)
                del self._tasks[key, stage]
        p.refresh()


async def watch(progress: LoadProgress, stream: TextIO | None = None, interval: float = 0.1) -> None:
    """Draw bars for the shards `progress` reports while they load (the agent runs this in its nursery).
    Returns at once when the stream is not a terminal."""
    import trio

    bars = Bars(stream)
    if not bars.enabled:
        return
    try:
        while True:
            bars.show(progress.snapshot())
            await trio.sleep(interval)
    finally:
        bars.close()
