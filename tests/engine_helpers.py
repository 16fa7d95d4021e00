"""Tiny random transformers models saved to disk, and an entry for them, for the engine's exactness tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than the default 0.02 so logits are far from zero and errors show
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """save_pretrained a randomly initialised tiny `arch` model (f32 safetensors) and return its directory."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    kwargs = dict(TINY)
    if arch == "qwen3":
        kwargs["head_dim"] = 32  # qwen3 decouples head_dim from hidden/heads: exercise that
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = out_dir / f"tiny-{arch}"
    model.save_pretrained(path, safe_serialization=True)
    return path


def reference_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits at the last position of `ids`."""
    import torch
    import transformers

    model = _cached_model(str(model_dir), transformers)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


_MODELS: dict = {}


def _cached_model(path: str, transformers):
    if path not in _MODELS:
        _MODELS[path] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    return _MODELS[path]


def run_sharded(shards, sid: str, ids: list[int], max_tokens: int = 128) -> list[np.ndarray]:
    """Feed `ids` as one prefill through a chain of shards; returns every hop's output (last = logits)."""
    for s in shards:
        s.open_session(sid, max_tokens)
    x = np.asarray(ids, dtype=np.int32)
    outs = []
    for s in shards:
        x = s.forward(sid, x)
        outs.append(x)
    return outs


def step_sharded(shards, sid: str, token: int) -> np.ndarray:
    x = np.asarray([token], dtype=np.int32)
    for s in shards:
        x = s.forward(sid, x)
    return x
