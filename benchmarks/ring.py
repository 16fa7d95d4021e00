"""Decode tok/s and time to first token for rings of 1, 2 and 3 peers on loopback, as ratios to 1 peer.

Each configuration is a fresh set of real agents (separate processes, libp2p on 127.0.0.1) whose
--memory-limit forces the ring size; only one configuration runs at a time, so they do not compete
for the CPU. Every configuration first serves one warm-up request (members load and compile their
shards), then REPEATS measured requests: a ~128-token prompt, 128 greedy tokens, streamed.

  TTFT      request sent -> first content chunk (prefill through the ring + first sample)
  decode    (tokens - 1) / (last chunk - first chunk)
  per hop   (ms per token at k peers - ms per token at 1 peer) / k: a k-ring makes k hops per
            token (k-1 hidden-state hops and the token's hop back to the first member)

Run: python benchmarks/ring.py [--repeats 3] [--tokens 128]

--synthetic: the synthetic ~1B-shaped Q4_0 model of benchmarks/engine.py (written once to its cache dir)
served by 3 peers whose --memory-limit is a third of what the model needs plus a margin, so that none of
them could hold it alone (the script checks that and prints both numbers); reports its decode tok/s and
layer ranges (there is no 1-peer baseline to divide by: that is the point).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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


def start_ring(work: Path, peers: int, limit: str | None = None, extra: tuple[str, ...] = ()) -> list[AgentProcess]:
    secret = new_secret()
    limit = limit or CONFIGS[peers]
    extra = (["--memory-limit", limit] if limit else []) + list(extra)
    agents = [AgentProcess(work, f"k{peers}-0", *extra, secret_hex=secret).start()]
    agents[0].wait_ready()
    for i in range(1, peers):
        agents.append(AgentProcess(work, f"k{peers}-{i}", *extra, "--bootstrap", agents[0].addr,
                                   secret_hex=secret).start())  # fmt: skip
    ids = {a.wait_ready()["peer_id"] for a in agents}
    for a in agents:
        wait_for(lambda a=a: a.view() == ids, 30, what="views")
    return agents


def one_request(client: openai.OpenAI, tokens: int, model: str = MODEL) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0,
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


def measure(peers: int, repeats: int, tokens: int, model: str = MODEL, limit: str | None = None,
            extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        agents = start_ring(Path(d), peers, limit, extra)
        try:
            entry = agents[-1]
            client = openai.OpenAI(base_url=entry.url + "/v1", api_key="x", timeout=900, max_retries=0)
            t0 = time.perf_counter()
            one_request(client, 8, model)  # warm-up: shards load and compile
            warm = time.perf_counter() - t0
            runs = [one_request(client, tokens, model) for _ in range(repeats)]
            layers = sorted(tuple(r) for a in agents for p in a.get("/v1/cluster")["peers"] if p["self"]
                            for r in p["layers"])  # fmt: skip
        except Exception:
            for a in agents:
                print(f"--- {a.name} log tail ---\n{a.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for a in agents:
                a.stop()
    ttft = statistics.median(r[0] for r in runs)
    tps = statistics.median(r[1] for r in runs)
    return {"peers": peers, "ttft": ttft, "tps": tps, "tokens": runs[0][2], "warm": warm, "layers": layers}


def synthetic(repeats: int, tokens: int) -> None:
    """The ~1B-shaped model over 3 peers that each offer about a third of what it needs."""
    from benchmarks.engine import SYNTH_1B_NAME, model_path
    from p2pinfer.engine import ModelCatalog
    from p2pinfer.serve.entry import model_needs

    cache = Path.home() / ".cache" / "p2pinfer-bench"
    path = model_path("synth-1b", cache)
    need = model_needs(ModelCatalog([path.parent], include_embedded=False).get(SYNTH_1B_NAME)).total_bytes
    limit = int(need / 3 * 1.2)
    assert limit < need, "the limit must leave every peer too small for the whole model"
    print(f"{SYNTH_1B_NAME}: needs {need / 2**20:.0f} MiB with KV headroom; each of 3 peers offers "
          f"{limit / 2**20:.0f} MiB (--memory-limit), so none can serve it alone")  # fmt: skip
    r = measure(3, repeats, tokens, SYNTH_1B_NAME, f"{limit // 2**20}M",
                ("--models-dir", str(path.parent), "--model", SYNTH_1B_NAME))  # fmt: skip
    print(f"3 peers: ttft {r['ttft']:.2f} s, decode {r['tps']:.2f} tok/s, layers {r['layers']}, "
          f"warm-up {r['warm']:.0f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--peers", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--synthetic", action="store_true", help="the ~1B-shaped model on 3 peers (see above)")
    args = ap.parse_args()
    if args.synthetic:
        return synthetic(args.repeats, args.tokens)
    results = [measure(k, args.repeats, args.tokens) for k in args.peers]
    base = results[0]
    print(
        f"\n{'peers':>5} {'ttft s':>8} {'decode tok/s':>13} {'x 1-peer':>9} {'ttft x':>7} {'ms/hop':>7}  layers"
    )
    for r in results:
        ms_tok, ms_tok1 = 1000 / r["tps"], 1000 / base["tps"]
        hop = (ms_tok - ms_tok1) / r["peers"] if r["peers"] > 1 else 0.0
        print(f"{r['peers']:>5} {r['ttft']:>8.3f} {r['tps']:>13.2f} {r['tps'] / base['tps']:>9.3f} "
              f"{r['ttft'] / base['ttft']:>7.2f} {hop:>7.2f}  {r['layers']}  (warm-up {r['warm']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
