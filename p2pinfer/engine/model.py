"""The llama-family transformer math in tinygrad, for a contiguous range of layers.

Everything here runs inside TinyJit captures, so the per-session state (the KV cache of each layer,
the start position) arrives as JIT inputs: one captured graph serves every session on the shard.
"""

from __future__ import annotations

import math

import numpy as np

from .device import ensure_configured

ensure_configured()  # tinygrad reads DEV once, at import: the engine's choice unless configure() ran first
from tinygrad import Tensor, UOp, dtypes

from . import native
from .model_config import ModelConfig
from .quant import QTensor, qlinear

# Canonical per-layer tensor names used by every loader (HF layout: Linear weights are (out, in)).
LAYER_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def rope_tables(cfg: ModelConfig, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (n_positions, head_dim/2) in float32, computed the way HF does (f32 inv_freq)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    sc = cfg.rope_scaling
    if sc is not None and sc.kind == "linear":
        inv_freq = inv_freq / np.float32(sc.factor)
    elif sc is not None and sc.kind == "llama3":
        # Llama 3.1 frequency-dependent scaling (transformers' _compute_llama3_parameters)
        low_wavelen = sc.original_context_length / sc.low_freq_factor
        high_wavelen = sc.original_context_length / sc.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
        smooth = (sc.original_context_length / wavelen - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    freqs = np.arange(n_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


def linear(x: Tensor, weight: QTensor | Tensor, bias: Tensor | None = None) -> Tensor:
    """x (T, in) @ weight.T; a QTensor is dequantised inside the matmul kernel (never as a whole)."""
    y = qlinear(x, weight) if isinstance(weight, QTensor) else x @ weight.T
    return y if bias is None else y + bias


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (heads, T, head_dim), rotate-half layout (HF); cos/sin: (T, head_dim/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def _qkv(cfg: ModelConfig, w: dict[str, Tensor | QTensor], x: Tensor, cos: Tensor, sin: Tensor):
    """x (T, hidden) -> q (H, T, hd), k (KV, T, hd) after rotary, v (KV, T, hd)."""
    T = x.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = rms_norm(x, w["attn_norm"], cfg.rms_eps)
    q = linear(h, w["q"], w.get("q_bias")).reshape(T, H, hd)
    k = linear(h, w["k"], w.get("k_bias")).reshape(T, KV, hd)
    v = linear(h, w["v"], w.get("v_bias")).reshape(T, KV, hd)
    if cfg.qk_norm:  # qwen3 normalises each head before rotary
        q, k = rms_norm(q, w["q_norm"], cfg.rms_eps), rms_norm(k, w["k_norm"], cfg.rms_eps)
    return apply_rope(q.transpose(0, 1), cos, sin), apply_rope(k.transpose(0, 1), cos, sin), v.transpose(0, 1)


def _attend(cfg: ModelConfig, q: Tensor, k: Tensor, v: Tensor, cache: Tensor, start_pos: int | UOp,
            mask: Tensor | None) -> Tensor:  # fmt: skip
    """Store k, v (KV, T, hd) at [start_pos, start_pos+T) of cache and attend q (H, T, hd) over it: (T, H*hd)."""
    T = q.shape[1]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    store = cache[:, :, start_pos : start_pos + T, :].uop.store(Tensor.stack(k, v).cast(cache.dtype).uop)
    kv = Tensor(cache.uop.after(store))
    if not isinstance(start_pos, int):  # causal attention over the cache as one native kernel (native.py)
        from tinygrad.helpers import NUM_CPU_THREADS

        attn = native.attention(q.reshape(H * T * hd).contiguous(), kv, start_pos, H, KV, hd, 1.0 / math.sqrt(hd),
                                max(1, NUM_CPU_THREADS.value), T)  # fmt: skip
        if attn is not None:
            return attn.reshape(T, H * hd)
    keys, values = kv[0, :, 0 : start_pos + T, :], kv[1, :, 0 : start_pos + T, :]
    if keys.dtype != dtypes.float32:
        keys, values = keys.float(), values.float()
    # grouped-query attention without repeating K/V: query heads of a group share one KV head
    group = H // KV
    scores = (q.reshape(KV, group * T, hd) @ keys.transpose(1, 2)) * (1.0 / math.sqrt(hd))
    if mask is not None:
        scores = (scores.reshape(KV, group, T, -1) + mask).reshape(KV, group * T, -1)
    return (scores.softmax(-1) @ values).reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd)


def _finish(cfg: ModelConfig, w: dict[str, Tensor | QTensor], x: Tensor, attn: Tensor) -> Tensor:
    x = x + linear(attn, w["o"])
    h = rms_norm(x, w["ffn_norm"], cfg.rms_eps)
    ff = linear(linear(h, w["gate"]).silu() * linear(h, w["up"]), w["down"])
    return (x + ff).contiguous()


def transformer_block(
    cfg: ModelConfig,
    w: dict[str, Tensor | QTensor],
    x: Tensor,
    cache: Tensor,
    start_pos: int | UOp,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """One decoder layer on x (T, hidden); cache is this layer's (2, n_kv, capacity, head_dim) KV buffer."""
    q, k, v = _qkv(cfg, w, x, cos, sin)
    return _finish(cfg, w, x, _attend(cfg, q, k, v, cache, start_pos, mask))


def transformer_block_rows(
    cfg: ModelConfig,
    w: dict[str, Tensor | QTensor],
    x: Tensor,
    caches: list[Tensor],
    starts: list[UOp],
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    """One decoder layer on B rows of x (B, hidden), row b the next position of its own session (KV cache
    caches[b], position starts[b]): the matrices are read once for all rows, attention runs per row."""
    q, k, v = _qkv(cfg, w, x, cos, sin)
    rows = [_attend(cfg, q[:, b : b + 1], k[:, b : b + 1], v[:, b : b + 1], c, s, None)
            for b, (c, s) in enumerate(zip(caches, starts, strict=True))]  # fmt: skip
    return _finish(cfg, w, x, rows[0].cat(*rows[1:], dim=0))


WeightSignature = tuple  # ((name, kind, shape, part names), ...): layers with equal signatures share kernels


def layer_signature(w: dict[str, Tensor | QTensor]) -> WeightSignature:
    out = []
    for name in sorted(w):
        v = w[name]
        if isinstance(v, QTensor):
            out.append((name, int(v.ggml_type), v.shape, tuple(sorted(v.parts))))
        else:
            out.append((name, None, tuple(v.shape), ()))
    return tuple(out)


def flatten_layer(w: dict[str, Tensor | QTensor]) -> list[Tensor]:
    """A layer's weights as a flat tensor list, in layer_signature's order (JIT inputs)."""
    flat: list[Tensor] = []
    for name in sorted(w):
        v = w[name]
        flat.extend(v.parts[p] for p in sorted(v.parts)) if isinstance(v, QTensor) else flat.append(v)
    return flat


def unflatten_layer(sig: WeightSignature, flat: list[Tensor]) -> dict[str, Tensor | QTensor]:
    from gguf import GGMLQuantizationType

    w, i = {}, 0
    for name, kind, shape, parts in sig:
        if kind is None:
            w[name], i = flat[i], i + 1
        else:
            w[name] = QTensor(
                GGMLQuantizationType(kind), shape, dict(zip(parts, flat[i : i + len(parts)], strict=True))
            )
            i += len(parts)
    return w


class LayerStack:
    """The shard's math as two pure step functions, each captured once and replayed for every layer.

    `layer_step` runs ONE decoder layer whose weights, KV cache and in/out activation buffers are all JIT
    inputs, so a single capture (per weight signature and chunk size) serves every layer of the shard:
    warm-up schedules one layer instead of all of them. `head_step` is the final norm + LM head.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        final_norm: Tensor | None,
        lm_head: QTensor | None,
        rope_positions: int,
    ):
        self.cfg, self.final_norm, self.lm_head = cfg, final_norm, lm_head
        cos, sin = rope_tables(cfg, rope_positions)
        self.cos, self.sin = Tensor(cos).realize(), Tensor(sin).realize()

    def layer_step(
        self, sig: WeightSignature, x: Tensor, out: Tensor, cache: Tensor, start_pos: int | UOp, weights: list
    ) -> Tensor:
        """out <- layer(x) for positions [start_pos, start_pos + T); x, out (T, hidden) float32."""
        T = x.shape[0]
        cos, sin = self.cos[start_pos : start_pos + T], self.sin[start_pos : start_pos + T]
        # causal mask "lower right": row i sees positions <= start_pos + i (rows past the real chunk are padding)
        mask = None if T == 1 else Tensor.full((T, start_pos + T), float("-inf")).triu(start_pos + 1)
        y = transformer_block(self.cfg, unflatten_layer(sig, weights), x, cache, start_pos, cos, sin, mask)
        return out.assign(y)

    def layer_step_rows(self, sig: WeightSignature, x: Tensor, out: Tensor, *args) -> Tensor:
        """out <- layer(x) for B rows of B sessions: args are B KV caches, B bound positions, the weights."""
        B = x.shape[0]
        caches, starts, weights = list(args[:B]), list(args[B : 2 * B]), args[2 * B]
        cos = self.cos[starts[0] : starts[0] + 1].cat(*[self.cos[s : s + 1] for s in starts[1:]])
        sin = self.sin[starts[0] : starts[0] + 1].cat(*[self.sin[s : s + 1] for s in starts[1:]])
        y = transformer_block_rows(self.cfg, unflatten_layer(sig, weights), x, caches, starts, cos, sin)
        return out.assign(y)

    def head_step_rows(self, sig: WeightSignature, x: Tensor, weights: list) -> Tensor:
        """x (B, hidden) -> logits (B, vocab) of every row."""
        w = unflatten_layer(sig, weights)
        return linear(rms_norm(x, w["norm"], self.cfg.rms_eps), w["head"])

    def head_weights(self) -> dict[str, Tensor | QTensor]:
        return {"norm": self.final_norm, "head": self.lm_head}

    def head_step(self, sig: WeightSignature, x: Tensor, last_row: int | UOp, weights: list) -> Tensor:
        """x (T, hidden) -> logits (vocab,) of row `last_row`; the weights are JIT inputs, as in layer_step."""
        w = unflatten_layer(sig, weights)
        last = x if x.shape[0] == 1 else x[last_row : last_row + 1]
        return linear(rms_norm(last, w["norm"], self.cfg.rms_eps), w["head"]).reshape(-1)
