"""The hand-written kernels (p2pinfer.engine.native) against numpy references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import p2pinfer.engine  # noqa: F401  (chooses tinygrad's device before tinygrad is imported)
from p2pinfer.engine import native, quant

tinygrad = pytest.importorskip("tinygrad")
from tinygrad import Context, Tensor, UOp  # noqa: E402


def _reference(qn, kvn, start, heads, kv_heads, hd):
    t = qn.shape[1]
    out = np.zeros((t, heads, hd), np.float64)
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(t):
            n = start + i + 1  # causal: query row i is position start + i
            s = kvn[0, g, :n].astype(np.float64) @ qn[h, i] / math.sqrt(hd)
            e = np.exp(s - s.max())
            out[i, h] = (e / e.sum()) @ kvn[1, g, :n]
    return out


@pytest.mark.parametrize("t,start", [(1, 0), (1, 37), (4, 5), (3, 60)])
def test_attention_matches_numpy(t, start):
    heads, kv_heads, hd, positions = 8, 2, 64, 64
    rng = np.random.default_rng(t * 100 + start)
    qn = rng.standard_normal((heads, t, hd)).astype(np.float32)
    kvn = rng.standard_normal((2, kv_heads, positions, hd)).astype(np.float32)
    q, kv = Tensor(qn).realize(), Tensor(kvn).realize()
    var = UOp.variable("start_pos", 0, positions - t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to tinygrad's attention is a failure here
        with Context(NUM_CPU_THREADS=2):
            out = native.attention(
                q.reshape(-1), kv, var.bind(start), heads, kv_heads, hd, 1 / math.sqrt(hd), 2, t
            )
            assert out is not None
            bound = var.bind(
                start
            )  # a kernel of the graph binds the variable (in the engine, the KV store does)
            y = (
                out.reshape(t, heads, hd) + kv[0:1, 0:1, bound : bound + 1, 0:1].reshape(1, 1, 1) * 0
            ).numpy()
    ref = _reference(qn, kvn, start, heads, kv_heads, hd)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("permute", [True, False], ids=["avx512-permute", "portable"])
def test_native_matvec_is_used(permute, monkeypatch):
    """The common decode and prefill types run the native body (no silent fallback to tinygrad's kernel), both
    the AVX-512 table-permute body (where the CPU has it) and the portable one (AVX2/NEON machines)."""
    from gguf import GGML_QUANT_SIZES, quants
    from gguf import GGMLQuantizationType as Q

    monkeypatch.setattr(native, "PERMUTE", permute)
    monkeypatch.setattr(quant, "_KERNELS", {})

    rng = np.random.default_rng(0)
    for qt in native.NATIVE_TYPES:
        for t in (1, 9):
            n, k = (40, 512) if qt in (Q.Q4_K, Q.Q6_K) else (40, 96)
            if not native.supported(qt, n, k, t):
                continue
            if qt in (Q.Q4_K, Q.Q6_K):  # gguf can't quantise K-quants: random blocks with sane fp16 scales
                block, bbytes = GGML_QUANT_SIZES[qt]
                raw = rng.integers(0, 256, (n, k // block, bbytes), dtype=np.uint8)
                for off in (0, 2) if qt == Q.Q4_K else (208,):
                    vals = rng.uniform(-0.01, 0.01, (n, k // block)).astype(np.float16)
                    raw[..., off : off + 2] = vals[..., None].view(np.uint8)
                raw = raw.reshape(n, -1)
            else:
                raw = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qt)
            qw = quant.QTensor.from_raw(raw, qt, (n, k))
            x = rng.standard_normal((t, k)).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                y = quant.qlinear(Tensor(x), qw).numpy()
            ref = x.astype(np.float64) @ quants.dequantize(raw, qt).astype(np.float64).T
            assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5, (Q(qt).name, t)
            key = next(key for key in quant._KERNELS if key[0] == qt and key[1] == (n, k) and key[2] == t)
            prg = quant._KERNELS[key][0]
            assert prg.op.name == "PROGRAM" and "f32x16" in prg.src[2].arg, (Q(qt).name, t)
