"""Hugging Face model directories: config.json + *.safetensors (single file or index), read per tensor.

Matrices keep their stored precision (F16/BF16 stay 16-bit, F32 stays 32-bit) as QTensors; vectors become float32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import ModelFileError, UnsupportedModelError
from .model_config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from .weights import resident_nbytes

_ARCH_BY_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_NAMES = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}


def is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelFileError(f"missing {path}") from e
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot parse {path}: {e}") from e


def config_from_hf(cfg: dict, where: Path) -> ModelConfig:
    model_type = cfg.get("model_type")
    arch = _ARCH_BY_MODEL_TYPE.get(model_type)
    if arch is None or arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} not supported (supported: {SUPPORTED_ARCHS})"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {cfg.get('hidden_act')!r} not supported")
    try:
        hidden, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        context = int(cfg.get("max_position_embeddings", 2048))
        # sliding-window attention is not implemented: cap the context where it would start to matter
        window = cfg.get("sliding_window")
        if window and (arch == "mistral" or cfg.get("use_sliding_window")):
            context = min(context, int(window))
        rope = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 layout
            rope = cfg["rope_parameters"]
            rope_theta = rope.get("rope_theta")
        scaling = None
        kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if kind == "linear":
            scaling = RopeScaling("linear", float(rope["factor"]))
        elif kind == "llama3":
            scaling = RopeScaling(
                "llama3",
                float(rope["factor"]),
                float(rope.get("low_freq_factor", 1.0)),
                float(rope.get("high_freq_factor", 4.0)),
                int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif kind != "default":
            raise UnsupportedModelError(f"{where}: rope scaling {kind!r} not supported")
        return ModelConfig(
            arch=arch,
            n_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            vocab_size=int(cfg["vocab_size"]),
            context_length=context,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            rope_scaling=scaling,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: config.json incomplete or malformed ({e!r})") from e


def _safetensors_header(path: Path) -> dict:
    """Tensor name -> header entry; reads only the JSON header, to find dtypes safe_open's numpy mode lacks."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    return header


class HFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFileError(f"model directory not found: {self.path}")
        self.config = config_from_hf(read_json(self.path / "config.json"), self.path / "config.json")
        self._headers: dict[Path, dict] = {}
        self._file_of = self._tensor_files()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            return {name: self.path / fname for name, fname in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{self.path}: no *.safetensors files")
        out = {}
        for f in files:
            header = _safetensors_header(f)
            self._headers[f] = header
            out.update({name: f for name in header if not name.startswith("__")})
        return out

    def has(self, name: str) -> bool:
        return name in self._file_of

    def _entry(self, name: str) -> tuple[Path, dict, dict]:
        path = self._file_of.get(name)
        if path is None:
            raise ModelFileError(f"{self.path}: tensor {name} missing")
        if not path.is_file():
            raise ModelFileError(f"{path}: file missing (needed for {name})")
        header = self._headers.get(path) or _safetensors_header(path)
        self._headers[path] = header
        entry = header.get(name)
        if entry is None:
            raise ModelFileError(f"{path}: tensor {name} missing")
        return path, header, entry

    def _raw(self, name: str) -> tuple[np.ndarray, str, tuple[int, ...]]:
        """The stored values, memory-mapped: (array, safetensors dtype, shape); BF16 as its uint16 bit patterns."""
        path, header, entry = self._entry(name)
        np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(entry["dtype"])
        if np_dtype is None:
            raise UnsupportedModelError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        try:
            raw = np.memmap(path, dtype=np_dtype, mode="r", offset=header["__data_start__"] + start,
                            shape=((end - start) // np.dtype(np_dtype).itemsize,))  # fmt: skip
            return raw.reshape(shape), entry["dtype"], shape
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{path}: cannot read tensor {name}: {e}") from e

    def tensor(self, name: str) -> np.ndarray:
        """A small tensor (norm, bias) as float32 numpy."""
        raw, dtype, _ = self._raw(name)
        if dtype == "BF16":  # numpy has no bfloat16: widen the raw bits by hand
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32)

    def matrix(self, name: str):
        """A weight matrix (out, in) as a QTensor in its stored precision."""
        from .quant import QTensor

        raw, dtype, shape = self._raw(name)
        if len(shape) != 2:
            raise ModelFileError(f"{self.path}: tensor {name} has shape {shape}, expected a matrix")
        if dtype == "BF16":
            return QTensor.from_bfloat16(raw)
        return QTensor.from_float16(raw) if dtype == "F16" else QTensor.from_float32(raw)

    def _nbytes(self, name: str) -> int:
        _, _, entry = self._entry(name)
        n = int(np.prod(entry["shape"]))
        return resident_nbytes(entry["dtype"], n)

    def layer(self, index: int) -> dict:
        prefix, out = f"model.layers.{index}.", {}
        for hf, name in _LAYER_NAMES.items():
            if self.has(prefix + hf):
                out[name] = self.matrix(prefix + hf) if hf.endswith("proj.weight") else self.tensor(prefix + hf)
        return out

    def layer_nbytes(self, index: int) -> int:
        prefix, total = f"model.layers.{index}.", 0
        for hf in _LAYER_NAMES:
            if self.has(prefix + hf):
                n = self._nbytes(prefix + hf)
                # vectors are held as float32 whatever their stored precision
                total += n if hf.endswith("proj.weight") else int(np.prod(self._entry(prefix + hf)[2]["shape"])) * 4
        return total

    def _head_name(self) -> str:
        tied = self.config.tie_embeddings or not self.has("lm_head.weight")
        return "model.embed_tokens.weight" if tied else "lm_head.weight"

    def embedding(self):
        if getattr(self, "_embedding", None) is None:
            self._embedding = self.matrix("model.embed_tokens.weight")
        return self._embedding

    def embedding_nbytes(self) -> int:
        return self._nbytes("model.embed_tokens.weight")

    def head_nbytes(self) -> int:
        return self._nbytes(self._head_name()) + self.config.hidden_size * 4

    def final_norm(self) -> np.ndarray:
        return self.tensor("model.norm.weight")

    def lm_head(self):
        name = self._head_name()
        return self.embedding() if name == "model.embed_tokens.weight" else self.matrix(name)

    def eos_token_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        for fname in ("generation_config.json", "config.json"):
            f = self.path / fname
            if f.is_file():
                eos = read_json(f).get("eos_token_id")
                for e in eos if isinstance(eos, list) else [eos]:
                    if e is not None and int(e) not in ids:
                        ids.append(int(e))
        return tuple(ids)

    def close(self) -> None:
        self._embedding = None
