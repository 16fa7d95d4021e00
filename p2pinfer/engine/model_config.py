"""The architecture facts the engine needs, normalised from HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Only the variants our supported checkpoints use; anything else is rejected at load time."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    tie_embeddings: bool
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    rope_scaling: RopeScaling | None = None

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_param_count(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        n = d * self.q_size + 2 * d * self.kv_size + self.q_size * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            n += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            n += 2 * self.head_dim
        return n


# How the engine holds the KV cache (weights stay in their file encoding: weights.resident_nbytes).
KV_BYTES = 4  # float32 KV cache
