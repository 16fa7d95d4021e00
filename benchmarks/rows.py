"""Decode throughput of one peer serving several sessions: B sessions stepped one after another (forward,
B weight reads a step) against B sessions in one step (Shard.forward_rows, one weight read), same process,
rounds interleaved. Prints aggregate tokens/s, the ratio, and the step time each session waits.

    python benchmarks/rows.py                                  # SmolLM2, B = 1 2 4 8
    python benchmarks/rows.py --model synth-1b --rows 1,2,4    # the synthetic 1B Q4_0 of benchmarks/engine.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine import model_path  # noqa: E402
from p2pinfer.engine import ModelCatalog, Shard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "synth-1b"))
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "p2pinfer-bench")
    args = ap.parse_args()

    path = model_path(args.model, args.cache_dir)
    catalog = ModelCatalog([] if args.model == "smollm2" else [path.parent])
    entry = next(e for e in catalog.list() if Path(e.path) == path)
    shard = Shard.load(entry, 0, entry.n_layers, max_context=2048)
    prompt = np.arange(100, 116, dtype=np.int64)
    print(f"{entry.name}: {args.steps} decode steps per round, {args.rounds} rounds, {shard.threads} threads")
    print(f"{'B':>3} {'alone tok/s':>12} {'rows tok/s':>11} {'ratio':>6} {'alone step ms':>14} {'rows step ms':>13}")
    for b in [int(x) for x in args.rows.split(",")]:
        times = {"alone": [], "rows": []}
        for r in range(args.rounds):
            for how in ("alone", "rows"):
                sids = [f"{how}-{r}-{i}" for i in range(b)]
                for sid in sids:
                    shard.open_session(sid, 2048)
                    shard.forward(sid, prompt)
                step = [(sid, np.asarray([7], dtype=np.int64)) for sid in sids]
                if how == "rows":
                    shard.forward_rows(step)  # the first use of a row count captures its kernels
                else:
                    [shard.forward(sid, x) for sid, x in step]
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    if how == "rows":
                        shard.forward_rows(step)
                    else:
                        for sid, x in step:
                            shard.forward(sid, x)
                times[how].append((time.perf_counter() - t0) / args.steps)
                for sid in sids:
                    shard.close_session(sid)
        alone, rows = statistics.median(times["alone"]), statistics.median(times["rows"])
        print(f"{b:>3} {b / alone:>12.1f} {b / rows:>11.1f} {alone / rows:>6.2f} {alone * 1e3:>14.2f}"
              f" {rows * 1e3:>13.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
