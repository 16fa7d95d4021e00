"""What a trio.to_thread round trip costs right after work that sweeps the caches (issue 12's hop analysis).

A ring hop hands a frame from a trio task to the engine's worker thread and the result back; each member
pays that once per token, and a lone peer too. This measures the two handoffs (task -> thread start,
thread end -> task resumed), medians over 250 calls, after three kinds of work in the thread:

  sleep    usleep(4 ms): no memory traffic (the handoff's own cost)
  sweep    a 140 MB numpy sum (SmolLM2's weights stream through the caches about like this), then 0.1 ms
  forward  a SmolLM2 decode step through the engine (the real thing, all 30 layers, this box's threads)

Run: python benchmarks/handoff.py [--gap 0.004]   (--gap: idle seconds between calls, as a ring member has)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CALLS, SKIP = 300, 50


async def measure(work, gap: float) -> tuple[float, float, float]:
    to_thread, back, inside = [], [], []
    for _ in range(CALLS):
        if gap:
            await trio.sleep(gap)
        marks: list[float] = []

        def call(marks: list[float] = marks) -> None:
            marks.append(time.perf_counter())
            work()
            marks.append(time.perf_counter())

        t0 = time.perf_counter()
        await trio.to_thread.run_sync(call)
        t1 = time.perf_counter()
        to_thread.append(marks[0] - t0)
        back.append(t1 - marks[1])
        inside.append(marks[1] - marks[0])
    med = lambda xs: statistics.median(xs[SKIP:]) * 1e6  # noqa: E731
    return med(to_thread), med(back), med(inside)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gap", type=float, default=0.0)
    args = ap.parse_args()

    from p2pinfer.engine import EMBEDDED_MODEL_NAME, ModelCatalog, Shard, use_kernel_cache

    use_kernel_cache(tempfile.mkdtemp(prefix="p2pinfer-handoff-"))
    entry = ModelCatalog([]).get(EMBEDDED_MODEL_NAME)
    shard = Shard.load(entry, 0, entry.n_layers, max_sessions=1, max_context=512)
    shard.open_session("s", 500)
    shard.forward("s", np.arange(1, 20, dtype=np.int32))
    libc = ctypes.CDLL(None)
    big = np.ones(140_000_000 // 4, np.float32)

    def forward():
        if shard.session_position("s") > 480:
            shard.close_session("s")
            shard.open_session("s", 500)
        shard.forward("s", np.array([5], np.int32))

    works = {"sleep": lambda: libc.usleep(4000), "sweep": lambda: (big.sum(), libc.usleep(100)), "forward": forward}
    print(f"trio.to_thread handoffs, medians of {CALLS - SKIP} calls, {args.gap * 1e3:.0f} ms idle between calls")
    print(f"{'work':>8} {'task->thread us':>16} {'thread->task us':>16} {'work us':>9}")
    for name, work in works.items():
        a, b, w = trio.run(measure, work, args.gap)
        print(f"{name:>8} {a:16.0f} {b:16.0f} {w:9.0f}")


if __name__ == "__main__":
    main()
