"""GGUF (llama.cpp) files: metadata, tokenizer fields, and tensors read lazily one at a time.

Weight matrices stay in their file encoding (QTensor: packed blocks copied straight out of the mmap);
only the small vectors (norms, biases) become float32 numpy arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError, UnsupportedModelError
from .gguf_file import GGUFFile
from .model_config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from .weights import resident_nbytes

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


def open_gguf_reader(path: Path) -> GGUFFile:
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    return GGUFFile(path)


def gguf_field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.field(key, default)


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute: llama.cpp rotates adjacent pairs, HF rotates halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_row_order(rows: int, n_heads: int) -> np.ndarray:
    """The same as a row order, to apply to packed (quantised) rows without dequantising them."""
    return _unpermute_rotary(np.arange(rows), n_heads)


_MATRICES = frozenset(("q", "k", "v", "o", "gate", "up", "down"))


class GGUFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_gguf_reader(self.path)
        self.config = self._read_config()
        self.tensors = self.reader.tensors

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
        vocab = gguf_field(r, f"{arch}.vocab_size") or r.array_length("tokenizer.ggml.tokens")
        names = set(r.tensors)
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

    def _info(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name} missing")
        return t

    def tensor(self, name: str) -> np.ndarray:
        """A small tensor (norm, bias) as float32 numpy, dequantized from its GGUF type."""
        from gguf import GGMLQuantizationType, quants

        t = self._info(name)
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

    def matrix(self, name: str, row_order: np.ndarray | None = None):
        """A weight matrix (out, in) as a QTensor in its file encoding; rows reordered on the packed bytes."""
        from .quant import QTensor

        t = self._info(name)
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) != 2:
            raise ModelFileError(f"{self.path}: tensor {name} has shape {shape}, expected a matrix")
        raw = t.data
        if row_order is not None:
            raw = np.asarray(raw).reshape(shape[0], -1)[row_order]  # a copy of the packed rows only
        try:
            return QTensor.from_raw(raw, t.tensor_type, shape)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{self.path}: tensor {name}: {e}") from e
        except (ValueError, IndexError) as e:
            raise ModelFileError(f"{self.path}: tensor {name} is truncated or corrupt: {e}") from e

    def _matrix_nbytes(self, name: str) -> int:
        t = self._info(name)
        return resident_nbytes(t.tensor_type.name, int(t.n_elements))

    def layer(self, index: int) -> dict:
        """Matrices as QTensors, the rest as float32 numpy; canonical names, HF orientation and rotary layout."""
        prefix, cfg = f"blk.{index}.", self.config
        permute = cfg.arch == "llama"  # only the llama converter permutes; qwen GGUFs keep HF's layout
        out: dict = {}
        for gguf_name, name in _LAYER_NAMES.items():
            full = prefix + gguf_name
            if full not in self.tensors:
                continue
            if name in _MATRICES:
                order = None
                if permute and name in ("q", "k"):
                    rows = int(self.tensors[full].shape[-1])
                    order = rotary_row_order(rows, cfg.n_heads if name == "q" else cfg.n_kv_heads)
                out[name] = self.matrix(full, order)
            else:
                out[name] = self.tensor(full)
                if permute and name in ("q_bias", "k_bias"):
                    heads = cfg.n_heads if name == "q_bias" else cfg.n_kv_heads
                    out[name] = _unpermute_rotary(out[name], heads)
        return out

    def layer_nbytes(self, index: int) -> int:
        """Resident bytes of layer `index` once loaded (packed matrices + float32 vectors)."""
        prefix, total = f"blk.{index}.", 0
        for gguf_name, name in _LAYER_NAMES.items():
            t = self.tensors.get(prefix + gguf_name)
            if t is not None:
                total += self._matrix_nbytes(t.name) if name in _MATRICES else int(t.n_elements) * 4
        return total

    def _head_name(self) -> str:
        return "token_embd.weight" if self.config.tie_embeddings else "output.weight"

    def embedding_nbytes(self) -> int:
        return self._matrix_nbytes("token_embd.weight")

    def head_nbytes(self) -> int:
        """The LM head plus the final norm (a tied head is counted: the last shard holds it)."""
        return self._matrix_nbytes(self._head_name()) + self.config.hidden_size * 4

    def embedding(self):
        """The token embedding as a QTensor; the same object as lm_head() when the model ties them."""
        if getattr(self, "_embedding", None) is None:
            self._embedding = self.matrix("token_embd.weight")
        return self._embedding

    def final_norm(self) -> np.ndarray:
        return self.tensor("output_norm.weight")

    def lm_head(self):
        return self.embedding() if self.config.tie_embeddings else self.matrix("output.weight")

    def eos_token_ids(self) -> tuple[int, ...]:
        eos = gguf_field(self.reader, "tokenizer.ggml.eos_token_id")
        ids = [int(eos)] if eos is not None else []
        eot = gguf_field(self.reader, "tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in ids:
            ids.append(int(eot))
        return tuple(ids)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.reader = None
        self.tensors = {}
        self._embedding = None
