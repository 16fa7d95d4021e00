"""GGUF (llama.cpp) files: metadata, tokenizer fields and dequantized tensors, read lazily per tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError, UnsupportedModelError
from .model_config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from .weights import EmbeddingTable

# llama.cpp names -> the engine's canonical per-layer names
_LAYER_NAMES = {
    "attn_q.weight": "q",
    "attn_k.weight": "k",
    "attn_v.weight": "v",
    "attn_output.weight": "o",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "attn_norm.weight": "attn_norm",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "gate",
    "ffn_up.weight": "up",
    "ffn_down.weight": "down",
}


def open_gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on garbage
        raise ModelFileError(f"cannot read GGUF file {path}: {e}") from e


def gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute: llama.cpp rotates adjacent pairs, HF rotates halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_gguf_reader(self.path)
        self.config = self._read_config()
        self.tensors = {t.name: t for t in self.reader.tensors}

    def _read_config(self) -> ModelConfig:
        r = self.reader
        arch = gguf_field(r, "general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{self.path}: architecture {arch!r} not supported (supported: {SUPPORTED_ARCHS})"
            )

        def need(key: str):
            value = gguf_field(r, f"{arch}.{key}")
            if value is None:
                raise ModelFileError(f"{self.path}: GGUF metadata lacks {arch}.{key}")
            return value

        hidden, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
        tokens = r.fields.get("tokenizer.ggml.tokens")
        vocab = gguf_field(r, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
        names = {t.name for t in r.tensors}
        scaling = None
        if gguf_field(r, f"{arch}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(gguf_field(r, f"{arch}.rope.scaling.factor")))
        elif gguf_field(r, f"{arch}.rope.scaling.type") not in (None, "none"):
            raise UnsupportedModelError(
                f"{self.path}: rope scaling {gguf_field(r, f'{arch}.rope.scaling.type')!r} not supported"
            )
        return ModelConfig(
            arch=arch,
            n_layers=int(need("block_count")),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(gguf_field(r, f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=int(gguf_field(r, f"{arch}.attention.key_length", hidden // n_heads)),
            vocab_size=int(vocab),
            context_length=int(need("context_length")),
            rms_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(gguf_field(r, f"{arch}.rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            rope_scaling=scaling,
        )

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 in numpy (row-major, HF orientation), dequantized from its GGUF type."""
        from gguf import GGMLQuantizationType, quants

        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name} missing")
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                out = np.asarray(t.data, dtype=np.float32)
            else:
                out = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} has unsupported type {t.tensor_type.name}"
            ) from e
        except (ValueError, IndexError) as e:
            raise ModelFileError(f"{self.path}: tensor {name} is truncated or corrupt: {e}") from e
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims innermost first
        return out.reshape(shape)

    def layer(self, index: int) -> dict[str, np.ndarray]:
        prefix = f"blk.{index}."
        out = {}
        for gguf_name, name in _LAYER_NAMES.items():
            if prefix + gguf_name in self.tensors:
                out[name] = self.tensor(prefix + gguf_name)
        cfg = self.config
        if cfg.arch == "llama":  # only the llama converter permutes; qwen GGUFs keep HF's layout
            out["q"] = _unpermute_rotary(out["q"], cfg.n_heads)
            out["k"] = _unpermute_rotary(out["k"], cfg.n_kv_heads)
            if "q_bias" in out:
                out["q_bias"] = _unpermute_rotary(out["q_bias"], cfg.n_heads)
                out["k_bias"] = _unpermute_rotary(out["k_bias"], cfg.n_kv_heads)
        return out

    def embedding_nbytes(self) -> int:
        """What embedding_table() will hold: float32 for float files, the raw quant blocks otherwise."""
        from gguf import GGMLQuantizationType

        t = self.tensors["token_embd.weight"]
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return int(t.n_elements) * 4
        return int(t.n_bytes)

    def embedding_table(self) -> EmbeddingTable:
        """The token embedding kept in its GGUF encoding (copied out of the mmap); rows dequantized on lookup."""
        from gguf import GGMLQuantizationType, quants

        t = self.tensors.get("token_embd.weight")
        if t is None:
            raise ModelFileError(f"{self.path}: tensor token_embd.weight missing")
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return EmbeddingTable(np.array(t.data, dtype=np.float32))
        qtype = t.tensor_type
        rows = np.array(t.data)  # (vocab, bytes per row): rows are independent runs of quant blocks
        try:
            quants.dequantize(rows[:1], qtype)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{self.path}: token_embd.weight has unsupported type {qtype.name}"
            ) from e
        return EmbeddingTable(rows, lambda picked: quants.dequantize(picked, qtype))

    def final_norm(self) -> np.ndarray:
        return self.tensor("output_norm.weight")

    def lm_head(self) -> np.ndarray:
        return self.tensor("token_embd.weight" if self.config.tie_embeddings else "output.weight")

    def eos_token_ids(self) -> tuple[int, ...]:
        eos = gguf_field(self.reader, "tokenizer.ggml.eos_token_id")
        ids = [int(eos)] if eos is not None else []
        eot = gguf_field(self.reader, "tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in ids:
            ids.append(int(eot))
        return tuple(ids)

    def close(self) -> None:
        self.reader = None
        self.tensors = {}
