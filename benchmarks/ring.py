"""Decode tok/s and time to first token for rings of 1, 2 and 3 peers on loopback, as ratios to 1 peer.

Each configuration is a fresh set of real agents (separate processes, libp2p on 127.0.0.1) whose
--memory-limit forces the ring size. All configurations run at once and take requests in turn, one at
a time, so they do not compete for the CPU, yet see the same load: this 2-core box is shared, and its
load swings by 3x within minutes. Every configuration first serves one warm-up request (members load
and compile their shards), then REPEATS measured requests: a ~128-token prompt, 128 greedy tokens,
streamed. Ratios and ms/hop are also given per round (against the same round's lone peer).

  TTFT      request sent -> first content chunk (prefill through the ring + first sample)
  decode    (tokens - 1) / (last chunk - first chunk)
  per hop   (ms per token at k peers - ms per token at 1 peer) / k: a k-ring makes k hops per
            token (k-1 hidden-state hops and the token's hop back to the first member)

Run: python benchmarks/ring.py [--repeats 3] [--tokens 128] [--synthetic] [--baseline TREE] [--trace]
                               [--default-sampling]
     python benchmarks/ring.py --setup 40 [--baseline TREE]

--baseline TREE: rings also run from another source tree (e.g. `git archive` of the commit before a
change), in the same rounds. --trace: member.py's per-step timestamps (P2PINFER_RING_TRACE), summed up
as the median microseconds of each stage of a hop: where the time per hop goes.

--setup: what a ring costs to set up, not to decode: 3-peer rings (this tree's, and --baseline's if
given) answer a 1-token request to "Hi" in rounds, the order alternating; each round one request after
a 2.5 s pause (pooled streams may need a ping first) and 3 back to back. Prints median wall times and the
ring streams each request opened (/metrics, summed over the ring's peers).

--synthetic: also the synthetic ~1B-shaped Q4_0 model of benchmarks/engine.py (written once to its cache
dir), first on one peer with no limit, then on 3 peers whose --memory-limit is a third of what the model
needs plus a margin, so that none of them could hold it alone (the script checks that and prints both
numbers). That is the realistic ring: a ring exists for a model that fits no single device, and at ~21 ms
per token a hop's fixed cost weighs 4x less than with SmolLM2's ~5 ms. --only-synthetic: that alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import AgentProcess, new_secret, wait_for  # noqa: E402

MODEL = "smollm2-135m"
CONFIGS = {1: None, 2: "150M", 3: "100M"}  # peers -> --memory-limit that forces exactly that ring
PROMPT = (
    "Summarise the following in one paragraph. The history of the lighthouse begins in antiquity, when "
    "fires were lit on hilltops to guide ships into harbour. The Pharos of Alexandria, built in the third "
    "century BC, stood for over a millennium. Medieval lighthouses burned wood and coal; the eighteenth "
    "century brought oil lamps and reflectors, and the nineteenth the Fresnel lens, which concentrated "
    "the light into a beam visible for twenty miles. Keepers lived in the towers, trimming wicks."
)


class TreeAgent(AgentProcess):
    """An agent run from another source tree (`--baseline`: the code before a change, in the same run)."""

    tree: Path | None = None

    def start(self) -> TreeAgent:
        if self.tree is None:
            return super().start()
        self._log = open(self.log_path, "ab")
        env = {**self.env, "PYTHONPATH": str(self.tree)}
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.tree)  # fmt: skip
        return self


def start_ring(work: Path, peers: int, limit: str | None = None, extra: tuple[str, ...] = (),
               tree: Path | None = None, env: dict | None = None) -> list[AgentProcess]:  # fmt: skip
    secret = new_secret()
    limit = CONFIGS[peers] if limit is None else limit
    extra = (["--memory-limit", limit] if limit else []) + list(extra)

    def agent(i: int, *more: str) -> TreeAgent:
        a = TreeAgent(work, f"k{peers}-{i}", *extra, *more, secret_hex=secret, env=env)
        a.tree = tree
        return a.start()

    agents = [agent(0)]
    agents[0].wait_ready()
    for i in range(1, peers):
        agents.append(agent(i, "--bootstrap", agents[0].addr))
    ids = {a.wait_ready()["peer_id"] for a in agents}
    for a in agents:
        wait_for(lambda a=a: a.view() == ids, 30, what="views")
    return agents


SAMPLING = {"temperature": 0}  # --default-sampling: {} (the model's defaults, as a client that sets none gets)


def one_request(client: openai.OpenAI, tokens: int, model: str = MODEL) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, **SAMPLING,
        stream=True, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.usage:
            n = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
    if first is None:
        raise RuntimeError(f"no content streamed ({n} completion tokens)")
    return first - t0, (n - 1) / (last - first) if last > first else float("nan"), n


def measure(configs: list[dict], repeats: int, tokens: int) -> list[dict]:
    """Every configuration ({peers, model, limit, extra, tree, trace}) runs at once, each its own cluster
    (its own secret, so they never merge), and requests go to them in turn, `repeats` rounds: this box is
    shared and its load swings by 3x within minutes, so only requests interleaved like this compare.
    An idle cluster costs little (gossip heartbeats; the engine's threads sleep)."""
    with ExitStack() as stack:
        clusters = []
        try:
            for c in configs:
                d = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                env = {"P2PINFER_RING_TRACE": str(d)} if c.get("trace") else None
                agents = start_ring(d, c["peers"], c.get("limit"), c.get("extra", ()), c.get("tree"), env)
                clusters.append((d, agents))
                stack.callback(lambda agents=agents: [a.stop() for a in agents])
            out = []
            for c, (d, agents) in zip(configs, clusters, strict=True):
                c["client"] = openai.OpenAI(base_url=agents[-1].url + "/v1", api_key="x", timeout=900,
                                            max_retries=0)  # fmt: skip
                t0 = time.perf_counter()
                one_request(c["client"], 8, c["model"])  # warm-up: shards load and compile
                c["warm"], c["runs"] = time.perf_counter() - t0, []
                for f in d.glob("*.jsonl"):
                    f.unlink()  # the warm-up's trace
            for _ in range(repeats):
                for c in configs:
                    c["runs"].append(one_request(c["client"], tokens, c["model"]))
            for c, (d, agents) in zip(configs, clusters, strict=True):
                time.sleep(1)  # members write their part's trace once the entry has closed the request
                layers = sorted(tuple(r) for a in agents for p in a.get("/v1/cluster")["peers"] if p["self"]
                                for r in p["layers"])  # fmt: skip
                parts = [json.loads(line) for f in d.glob("*.jsonl") for line in f.read_text().splitlines()]
                runs = c["runs"]
                out.append({"peers": c["peers"], "ttft": statistics.median(r[0] for r in runs),
                            "tps": statistics.median(r[1] for r in runs), "round_tps": [r[1] for r in runs],
                            "tokens": runs[0][2], "warm": c["warm"], "layers": layers, "tree": c.get("tree"),
                            "trace": breakdown(parts) if parts else None})  # fmt: skip
            return out
        except Exception:
            for _, agents in clusters:
                for a in agents:
                    print(f"--- {a.name} log tail ---\n{a.log()[-3000:]}", file=sys.stderr)
            raise


def _streams_opened(agents: list[AgentProcess]) -> float | None:
    """Ring streams the agents opened so far; None from a tree that does not count them."""
    total = None
    for a in agents:
        with urllib.request.urlopen(f"{a.url}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('p2pinfer_ring_streams_total{how="opened"}'):
                    total = (total or 0.0) + float(line.split()[-1])
    return total


def measure_setup(trees: dict[str, Path | None], rounds: int) -> None:
    """Ring set-up cost (--setup): 1-token requests to 3-peer rings of each tree, interleaved."""

    def ask(client: openai.OpenAI) -> float:
        t0 = time.perf_counter()
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                       temperature=0)  # fmt: skip
        return time.perf_counter() - t0

    with ExitStack() as stack:
        rings = {}
        for name, tree in trees.items():
            d = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            agents = start_ring(d, 3, tree=tree)
            stack.callback(lambda agents=agents: [a.stop() for a in agents])
            client = openai.OpenAI(base_url=agents[-1].url + "/v1", api_key="x", timeout=900, max_retries=0)
            ask(client), ask(client)  # shards load, pools fill
            rings[name] = (client, agents)
        paused = {n: [] for n in rings}
        burst = {n: [] for n in rings}
        opened = {n: _streams_opened(agents) for n, (_, agents) in rings.items()}
        for r in range(rounds):
            order = list(rings.items()) if r % 2 else list(rings.items())[::-1]
            for n, (client, _) in order:
                time.sleep(2.5)
                paused[n].append(ask(client))
            for n, (client, _) in order:
                burst[n] += [ask(client) for _ in range(3)]
        for n, (_, agents) in rings.items():
            now = _streams_opened(agents)
            streams = ("streams opened: not counted by this tree" if now is None else
                       f"{(now - opened[n]) / (4 * rounds):.2f} streams opened per request")  # fmt: skip
            print(f"{n}: 1-token request, 3-peer ring: after a 2.5 s pause {statistics.median(paused[n]) * 1e3:.1f} ms, "
                  f"back to back {statistics.median(burst[n]) * 1e3:.1f} ms (medians of {rounds} and {3 * rounds}); "
                  f"{streams}")


def _steps(events: list) -> list[dict]:
    """A part's events (member.py's _Trace) as one dict per forward: in, got, call, t0, t1, back, sent."""
    steps: list[dict] = []
    for what, t in events:
        if what in ("in", "call") and (not steps or what in steps[-1] or "call" in steps[-1]):
            steps.append({})
        steps[-1][what] = t
    return steps


def breakdown(parts: list[dict]) -> dict:
    """Median microseconds per token of each stage of a hop, over the measured requests' decode steps (the
    warm-up's too few to matter). A hop is followed from the sender's 'back' (its forward returned to its
    trio task) to the receiver's 't0' (its forward started in the engine's thread)."""
    by_rid: dict[str, dict[int, list[dict]]] = {}
    for p in parts:
        by_rid.setdefault(p["rid"], {})[p["i"]] = _steps(p["events"])
    sizes = {p["rid"]: p["k"] for p in parts}
    by_rid = {rid: m for rid, m in by_rid.items() if len(m) == sizes[rid]}  # every member's part written
    stages: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        stages.setdefault(name, []).append(seconds * 1e6)

    for members in by_rid.values():
        k = len(members)
        for i, steps in members.items():
            for st in steps:
                m = f"[{i}]" if k > 1 else ""
                if {"t0", "t1"} <= st.keys():
                    add(f"compute{m}", st["t1"] - st["t0"])
                if {"t1", "back"} <= st.keys():
                    add(f"thread -> task{m}", st["back"] - st["t1"])
                if {"call", "t0"} <= st.keys():
                    add(f"task -> thread{m}", st["t0"] - st["call"])
                if {"in", "got"} <= st.keys():
                    add(f"reader -> task{m}", st["got"] - st["in"])
                if {"back", "sent"} <= st.keys():
                    add(f"sample + encode + write{m}" if i == k - 1 else f"encode + write{m}", st["sent"] - st["back"])
                if "in" in st and k > 1:  # the frame's sender, the member before us, got its forward's result
                    sender = [s for s in members.get((i - 1) % k, []) if s.get("back", 1e18) <= st["in"]]
                    if sender:
                        prev = max(sender, key=lambda s: s["back"])
                        add(f"hop {(i - 1) % k}->{i}: sender's forward back -> frame read", st["in"] - prev["back"])
                        if "t0" in st:
                            add(f"gap {(i - 1) % k}->{i}: sender's forward end -> ours starts", st["t0"] - prev["t1"])
            if k == 1:
                for a, b in zip(steps, steps[1:], strict=False):
                    if "t1" in a and "t0" in b:
                        add("gap: one forward's end -> the next one's start", b["t0"] - a["t1"])
    out = {name: statistics.median(v) for name, v in stages.items()}
    reporters = {p["report"] for p in parts if p["k"] > 1 and "report" in p}
    if len(reporters) == 1:  # the member that hosts the entry, when the entry is in the ring
        out["(the reporting member's index)"] = float(reporters.pop())
    gaps = [us for name, us in out.items() if name.startswith("gap ")]
    if gaps:  # between two forwards on the token's way round: all a ring adds to a lone peer's token
        out["gaps summed: a token's way round, compute excluded"] = sum(gaps)
    return out


def synthetic_setup() -> tuple[str, str, tuple[str, ...]]:
    """The ~1B-shaped model: its name, a --memory-limit that splits it over 3 peers (none could hold it
    alone), and the flags that serve it."""
    from benchmarks.engine import SYNTH_1B_NAME, model_path
    from p2pinfer.config import DEFAULT_CAPACITY
    from p2pinfer.engine import ModelCatalog
    from p2pinfer.serve.entry import model_needs

    cache = Path.home() / ".cache" / "p2pinfer-bench"
    path = model_path("synth-1b", cache)
    entry = ModelCatalog([path.parent], include_embedded=False).get(SYNTH_1B_NAME)
    need = model_needs(entry, DEFAULT_CAPACITY.kv_tokens).total_bytes
    limit = int(need / 3 * 1.2)
    assert limit < need, "the limit must leave every peer too small for the whole model"
    print(f"{SYNTH_1B_NAME}: needs {need / 2**20:.0f} MiB with KV headroom; each of 3 ring peers offers "
          f"{limit / 2**20:.0f} MiB (--memory-limit), so none can serve it alone")  # fmt: skip
    return SYNTH_1B_NAME, f"{limit // 2**20}M", ("--models-dir", str(path.parent), "--model", SYNTH_1B_NAME)


def report(name: str, results: list[dict]) -> None:
    base = results[0]
    print(f"\n{name}\n{'peers':>5} {'ttft s':>8} {'decode tok/s':>13} {'x 1-peer':>9} {'ttft x':>7} {'ms/hop':>7}  layers")
    for r in results:
        ms_tok, ms_tok1 = 1000 / r["tps"], 1000 / base["tps"]
        hop = (ms_tok - ms_tok1) / r["peers"] if r["peers"] > 1 else 0.0
        print(f"{r['peers']:>5} {r['ttft']:>8.3f} {r['tps']:>13.2f} {r['tps'] / base['tps']:>9.3f} "
              f"{r['ttft'] / base['ttft']:>7.2f} {hop:>7.3f}  {r['layers']}  (warm-up {r['warm']:.0f} s)"
              f"{'  BASELINE ' + str(r['tree']) if r['tree'] else ''}")  # fmt: skip
    for r in results[1:]:  # the same round's lone request is the fairest baseline under a swinging load
        ratios = [t / t1 for t, t1 in zip(r["round_tps"], base["round_tps"], strict=True)]
        hops = [(1000 / t - 1000 / t1) / r["peers"] for t, t1 in zip(r["round_tps"], base["round_tps"], strict=True)]
        print(f"  {r['peers']} peers{' (baseline)' if r['tree'] else ''}: per round x 1-peer "
              f"{' '.join(f'{x:.3f}' for x in ratios)}, ms/hop {' '.join(f'{x:.3f}' for x in hops)}")
    lone_gap = (base["trace"] or {}).get("gap: one forward's end -> the next one's start")
    for r in results[1:]:
        ring_gaps = (r["trace"] or {}).get("gaps summed: a token's way round, compute excluded")
        if lone_gap is not None and ring_gaps is not None:
            print(f"  {r['peers']} peers{' (baseline)' if r['tree'] else ''}: per-hop overhead from the traces "
                  f"(gaps between forwards, summed, minus the lone peer's gap, / peers): "
                  f"{(ring_gaps - lone_gap) / r['peers'] / 1000:.3f} ms")  # fmt: skip
    for r in results:
        if r["trace"]:
            print(f"  {r['peers']} peer(s){' (baseline)' if r['tree'] else ''}, median us per step:")
            for stage, us in sorted(r["trace"].items()):
                print(f"    {stage:<48} {us:>9.1f}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--peers", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--synthetic", action="store_true",
                    help="also the ~1B-shaped model: 1 peer, then 3 peers none of which could hold it alone")  # fmt: skip
    ap.add_argument("--only-synthetic", action="store_true", help="the ~1B-shaped model alone")
    ap.add_argument("--baseline", type=Path, help="a source tree (the code before a change) whose rings run "
                    "too, each right before this tree's, so both are measured under the same load")  # fmt: skip
    ap.add_argument("--trace", action="store_true", help="per-stage times of a hop (P2PINFER_RING_TRACE)")
    ap.add_argument("--default-sampling", action="store_true",
                    help="requests set no sampling fields (the model's defaults: temperature 0.8, top_k 40, ...) "
                    "instead of greedy")  # fmt: skip
    ap.add_argument("--setup", type=int, metavar="ROUNDS", help="ring set-up cost instead of decode (see above)")
    args = ap.parse_args()
    if args.default_sampling:
        SAMPLING.clear()
    if args.setup:
        measure_setup({"this tree": None, **({f"baseline {args.baseline}": args.baseline} if args.baseline else {})},
                      args.setup)  # fmt: skip
        return

    def configs(model: str, peers: list[int], limit=None, extra=()) -> None:
        out = []
        for k in peers:
            lim = limit if k > 1 else ("" if limit else None)
            if args.baseline:
                out.append({"peers": k, "model": model, "limit": lim, "extra": extra, "tree": args.baseline,
                            "trace": args.trace})  # fmt: skip
            out.append({"peers": k, "model": model, "limit": lim, "extra": extra, "trace": args.trace})
        results = measure(out, args.repeats, args.tokens)
        if args.baseline:  # each tree's rings against its own lone peer, from the same rounds
            report(f"{model}, baseline {args.baseline}", [r for r in results if r["tree"]])
        report(model, [r for r in results if not r["tree"]])

    if not args.only_synthetic:
        configs(MODEL, args.peers)
    if args.synthetic or args.only_synthetic:
        name, limit, extra = synthetic_setup()
        configs(name, [1, 3], limit, extra)


if __name__ == "__main__":
    main()
