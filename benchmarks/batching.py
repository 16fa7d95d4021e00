"""Continuous batching: aggregate decode throughput when several clients stream at once, on one peer and
on a 3-peer ring, each from this tree and (--baseline TREE, e.g. a `git archive` of the commit before a
change) from another, in the same rounds, the order alternating. Each round sends C concurrent streamed
requests (greedy, --tokens each) to a fresh cluster's first agent and times the whole burst.

  agg tok/s    completion tokens of the burst / its wall time (first request sent -> last chunk)
  stream tok/s median over the burst's requests of (tokens - 1) / (last chunk - first chunk)
  steps        /metrics p2pinfer_decode_steps_total summed over the cluster: sessions per decode step

Run: python benchmarks/batching.py [--clients 1 4 8] [--peers 1 3] [--tokens 64] [--rounds 3]
                                    [--baseline TREE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ring import MODEL, PROMPT, start_ring  # noqa: E402


def burst(url: str, clients: int, tokens: int) -> tuple[float, float, int]:
    """C concurrent streamed requests; (aggregate tok/s, median per-stream decode tok/s, tokens)."""
    results: list[tuple[int, float, float]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0)
        try:
            first = last = None
            n = 0
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"{PROMPT} ({i})"}], max_tokens=tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
            for chunk in stream:
                if chunk.usage:
                    n = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    last = time.perf_counter()
                    first = first or last
            results.append((n, first, last))
        except BaseException as e:  # reported after the burst
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} requests failed: {errors[0]!r}")
    total = sum(n for n, _, _ in results)
    wall = max(last for _, _, last in results) - t0
    per_stream = statistics.median((n - 1) / (last - first) for n, first, last in results if last > first)
    return total / wall, per_stream, total


def step_counts(agents) -> dict[str, float]:
    out: dict[str, float] = {}
    for a in agents:
        with urllib.request.urlopen(f"{a.url}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("p2pinfer_decode_steps_total{"):
                    k = line.split('"')[1]
                    out[k] = out.get(k, 0) + float(line.split()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--peers", type=int, nargs="*", default=[1, 3])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path)
    args = ap.parse_args()
    trees = {"this tree": None, **({"baseline": args.baseline} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        clusters = {}
        for peers in args.peers:
            for name, tree in trees.items():
                work = Path(tmp) / f"{peers}-{name.replace(' ', '-')}"
                work.mkdir()
                agents = start_ring(work, peers, tree=tree)
                for a in agents:
                    stack.callback(a.stop)
                burst(agents[0].url, 1, 4)  # warm-up: members load and compile their shards
                clusters[peers, name] = agents
        print(f"{MODEL}, {args.tokens} tokens per request, {args.rounds} rounds (medians)")
        print(f"{'peers':>5} {'C':>3} {'tree':<10} {'agg tok/s':>10} {'stream tok/s':>13} {'x baseline':>11}  steps")
        for peers in args.peers:
            for c in args.clients:
                got: dict[str, list] = {name: [] for name in trees}
                for r in range(args.rounds):
                    for name in list(trees)[:: 1 if r % 2 == 0 else -1]:
                        got[name].append(burst(clusters[peers, name][0].url, c, args.tokens))
                base = statistics.median(g[0] for g in got["baseline"]) if "baseline" in got else None
                for name in trees:
                    agg = statistics.median(g[0] for g in got[name])
                    stream = statistics.median(g[1] for g in got[name])
                    ratio = f"{agg / base:>11.2f}" if base else f"{'':>11}"
                    steps = step_counts(clusters[peers, name]) if name == "this tree" else {}
                    print(f"{peers:>5} {c:>3} {name:<10} {agg:>10.1f} {stream:>13.1f} {ratio}  "
                          + " ".join(f"{k}:{v:.0f}" for k, v in sorted(steps.items(), key=lambda kv: int(kv[0]))))  # fmt: skip


if __name__ == "__main__":
    main()
