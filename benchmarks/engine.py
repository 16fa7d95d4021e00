"""How fast is the tinygrad engine on SmolLM2-135M? Prefill (128-token prompt) and decode (128 tokens) tok/s,
printed as ratios against a plain numpy forward and llama.cpp (llama-cpp-python, if installed), all in one run.

    python benchmarks/engine.py [--tokens 128] [--skip-llama-cpp]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np

from p2pinfer.engine import EMBEDDED_MODEL_NAME, ModelCatalog, Shard, Tokenizer
from p2pinfer.engine.gguf_loader import GGUFSource
from p2pinfer.engine.model import rope_tables

PROMPT = (
    "The history of computing is a story of people and machines. Early mechanical calculators gave way to "
    "electronic computers, which filled rooms and consumed enormous amounts of power. Over the decades, "
)


def prompt_ids(tokenizer: Tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT * 8)
    assert len(ids) >= n
    return ids[:n]


class NumpyLlama:
    """The same forward pass in plain numpy (float32, OpenBLAS): the baseline the issue asks for."""

    def __init__(self, source: GGUFSource, max_context: int):
        self.cfg = cfg = source.config
        self.layers = [source.layer(i) for i in range(cfg.n_layers)]
        self.embed = source.embedding_table()
        self.norm, self.head = source.final_norm(), source.lm_head()
        self.cos, self.sin = rope_tables(cfg, max_context)
        self.k = np.zeros((cfg.n_layers, cfg.n_kv_heads, max_context, cfg.head_dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.pos = 0

    def _rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg.rms_eps) * w

    def _rope(self, x, cos, sin):  # x (heads, T, hd)
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        cfg, T, p = self.cfg, len(ids), self.pos
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = self.embed.lookup(ids)
        cos, sin = self.cos[p : p + T], self.sin[p : p + T]
        mask = np.triu(np.full((T, p + T), -np.inf, np.float32), p + 1)
        for i, w in enumerate(self.layers):
            h = self._rms(x, w["attn_norm"])
            q = self._rope((h @ w["q"].T).reshape(T, H, hd).transpose(1, 0, 2), cos, sin)
            k = self._rope((h @ w["k"].T).reshape(T, KV, hd).transpose(1, 0, 2), cos, sin)
            self.k[i, :, p : p + T], self.v[i, :, p : p + T] = (
                k,
                (h @ w["v"].T).reshape(T, KV, hd).transpose(1, 0, 2),
            )
            g = H // KV
            s = q.reshape(KV, g * T, hd) @ self.k[i, :, : p + T].transpose(0, 2, 1) / math.sqrt(hd)
            s = (s.reshape(KV, g, T, -1) + mask).reshape(KV, g * T, -1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ self.v[i, :, : p + T]).reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)
            x = x + a @ w["o"].T
            h = self._rms(x, w["ffn_norm"])
            gate = h @ w["gate"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w["up"].T)) @ w["down"].T
        self.pos += T
        return self._rms(x[-1:], self.norm) @ self.head.T


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


def bench_engine(entry, ids, n):
    t0 = time.perf_counter()
    shard = Shard.load(entry, 0, entry.n_layers, max_sessions=1, max_context=len(ids) + n + 8)
    load_total = time.perf_counter() - t0
    shard.open_session("bench", len(ids) + n + 8)
    fwd = lambda x: shard.forward("bench", x)  # noqa: E731
    pre, dec, out = run_loop(fwd, fwd, ids, n)
    return pre, dec, out, (shard.load_seconds, shard.warm_seconds, load_total)


def bench_numpy(entry, ids, n):
    model = NumpyLlama(GGUFSource(entry.path), len(ids) + n + 8)
    return run_loop(model.forward, model.forward, ids, n)


def bench_llama_cpp(entry, ids, n, threads):
    from llama_cpp import Llama

    llm = Llama(
        entry.path, n_ctx=len(ids) + n + 8, n_threads=threads, n_batch=512, verbose=False, logits_all=False
    )

    def prefill(x):
        llm.reset()
        llm.eval(list(map(int, x)))
        return np.asarray(llm.scores[llm.n_tokens - 1])

    def step(x):
        llm.eval([int(x[0])])
        return np.asarray(llm.scores[llm.n_tokens - 1])

    return run_loop(prefill, step, ids, n)


def fresh_process_load_seconds(entry_name: str) -> float:
    """Shard.load to ready (weights + JIT warm-up) in a new process: what every agent start pays."""
    code = (
        "import time; t=time.perf_counter();"
        "from p2pinfer.engine import ModelCatalog, Shard;"
        f"e=ModelCatalog([]).get({entry_name!r}); t1=time.perf_counter();"
        "s=Shard.load(e, 0, e.n_layers, max_context=512);"
        "print(time.perf_counter()-t1, s.load_seconds, s.warm_seconds)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--fresh-process", action="store_true", help="also time Shard.load in a new process")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    entry = ModelCatalog([]).get(EMBEDDED_MODEL_NAME)
    ids = prompt_ids(Tokenizer.from_entry(entry), args.tokens)
    n = args.tokens
    print(f"SmolLM2-135M Q4_1 GGUF, prompt {len(ids)} tokens, decode {n} tokens, DEV={os.environ.get('DEV')}")

    results = {}
    e_pre, e_dec, e_out, (load_s, warm_s, total_s) = bench_engine(entry, ids, n)
    results["tinygrad engine"] = (e_pre, e_dec)
    print(f"engine load: weights {load_s:.1f}s + JIT warm-up {warm_s:.1f}s = {total_s:.1f}s (this process)")
    n_pre, n_dec, n_out = bench_numpy(entry, ids, n)
    results["numpy f32"] = (n_pre, n_dec)
    same = next((i for i, (a, b) in enumerate(zip(e_out, n_out, strict=True)) if a != b), n)
    print(f"engine and numpy agree on the first {same} of {n} greedy tokens")
    if not args.skip_llama_cpp:
        try:
            results[f"llama.cpp ({args.threads} threads)"] = bench_llama_cpp(entry, ids, n, args.threads)[:2]
        except ImportError:
            print("llama-cpp-python not installed: skipping that baseline")
    print(
        f"\n{'':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'engine/this prefill':>20s} {'engine/this decode':>19s}"
    )
    for name, (pre, dec) in results.items():
        print(f"{name:24s} {pre:14.1f} {dec:13.1f} {e_pre / pre:20.2f} {e_dec / dec:19.2f}")
    if args.fresh_process:
        total, load, warm = fresh_process_load_seconds(EMBEDDED_MODEL_NAME)
        print(f"\nfresh process: Shard.load to ready {total:.1f}s (weights {load:.1f}s, warm-up {warm:.1f}s)")


if __name__ == "__main__":
    main()
