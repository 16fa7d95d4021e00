"""Election benchmark: how long `elect_ring` takes on views of 10 to 1,000 peers (goal: < 1 ms at 1,000).

Pure function, one process, no network. Views are random but seeded: peers with 1-16 GiB free (a
tenth are gateways with none), load 0-3, compute 10-200, ids random. Scenarios:

- fits-one: a model one peer can hold (SmolLM2-like, 0.6 GiB): k = 1.
- split-3:  a 30 GiB model (80 layers) whose ring needs several peers.
- warm:     split-3 again with the ring elected before now holding its layers (warm reuse).
- excluded: split-3 with the first ring's members excluded (the replay path after a member dies).

Time: median (and max) of REPS calls per scenario after one warm-up call, with time.perf_counter.

Run: python benchmarks/election.py [--sizes 10,100,1000] [--reps 50]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pinfer.cluster.ring import Candidate, ClusterTooSmall, ModelNeeds, elect_ring  # noqa: E402

GiB = 1024**3
SMALL = ModelNeeds("small", 30, 18 * 2**20, 50 * 2**20, 50 * 2**20, 2 * 9 * 64 * 4 * 2, 2048)
LARGE = ModelNeeds("large", 80, 350 * 2**20, 1 * GiB, 1 * GiB, 2 * 8 * 128 * 2, 4096)


def view(n: int, rng: random.Random) -> list[Candidate]:
    out = []
    for _ in range(n):
        gateway = rng.random() < 0.1
        out.append(
            Candidate(
                peer_id="12D3KooW" + "".join(rng.choice("abcdefghijkmnopqrstuvwxyz123456789") for _ in range(44)),
                memory_free=0 if gateway else rng.randint(1 * GiB, 16 * GiB),
                load=rng.randint(0, 3),
                compute=rng.uniform(10, 200),
            )
        )
    return out


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"{'N':>5} {'scenario':>9} {'k':>3} {'median ms':>10} {'max ms':>8}")
    for n in [int(s) for s in args.sizes.split(",")]:
        cands = view(n, rng)
        first = elect_ring(cands, LARGE)
        by_id = {m.peer_id: m for m in first}
        warm = [
            replace(c, held=(("large", by_id[c.peer_id].start, by_id[c.peer_id].end),)) if c.peer_id in by_id else c
            for c in cands
        ]
        excluded = frozenset(by_id)
        scenarios = {
            "fits-one": (lambda c=cands: elect_ring(c, SMALL)),
            "split-3": (lambda c=cands: elect_ring(c, LARGE)),
            "warm": (lambda c=warm: elect_ring(c, LARGE)),
            "excluded": (lambda c=cands, x=excluded: elect_ring(c, LARGE, exclude=x)),
        }
        for name, fn in scenarios.items():
            try:
                k = len(fn())
            except ClusterTooSmall:
                print(f"{n:>5} {name:>9}   - (cluster too small)")
                continue
            med, worst = timed(fn, args.reps)
            print(f"{n:>5} {name:>9} {k:>3} {1e3 * med:>10.3f} {1e3 * worst:>8.3f}", flush=True)
    print("\ngoal: < 1 ms at N = 1000 (median)")


if __name__ == "__main__":
    main()
