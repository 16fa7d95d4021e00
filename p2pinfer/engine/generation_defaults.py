"""A model's recommended sampling values, where its files carry them; llama-server's defaults otherwise.

GGUF files may hold `general.sampling.*` keys (temp, top_k, top_p, min_p, penalty_repeat), Hugging Face
directories a generation_config.json (temperature, top_k, top_p, min_p, repetition_penalty). A field
the model does not give falls back to llama-server's default, so a client that sends no sampling
fields gets what it would get from llama.cpp: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05.
`do_sample: false` in a generation_config.json is not read as "greedy": HF writes it by default.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

LLAMA_SERVER_DEFAULTS = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}

_GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
_HF_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_RANGES = {"temperature": (0, 2), "top_k": (0, 10**6), "top_p": (0, 1), "min_p": (0, 1),
           "repetition_penalty": (0.01, 10)}  # fmt: skip


def _clean(found: dict) -> dict:
    """Keep values of the right kind and range; a model file is not trusted to be sensible."""
    out = {}
    for k, v in found.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            continue
        lo, hi = _RANGES[k]
        if lo <= v <= hi:
            out[k] = int(v) if k == "top_k" else float(v)
    if out.get("top_p") == 0:
        out.pop("top_p")
    return out


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _from_gguf(path: Path) -> dict:
    """Scan the GGUF key-value header for the sampling keys (skipping the rest, e.g. the vocabulary,
    without building it: gguf.GGUFReader takes seconds on a big tokenizer)."""
    import mmap
    import struct

    found = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            return {}
        version = struct.unpack_from("<I", m, 4)[0]
        if version < 2:
            return {}
        n_kv = struct.unpack_from("<Q", m, 16)[0]
        pos = 24

        def string(pos: int) -> tuple[bytes, int]:
            n = struct.unpack_from("<Q", m, pos)[0]
            return m[pos + 8 : pos + 8 + n], pos + 8 + n

        def skip(kind: int, pos: int) -> int:
            if kind in _SCALAR:
                return pos + struct.calcsize(_SCALAR[kind])
            if kind == 8:
                return string(pos)[1]
            if kind == 9:
                sub, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if sub in _SCALAR:
                    return pos + count * struct.calcsize(_SCALAR[sub])
                for _ in range(count):
                    pos = skip(sub, pos)
                return pos
            raise ValueError(f"unknown GGUF value type {kind}")

        for _ in range(n_kv):
            key, pos = string(pos)
            kind = struct.unpack_from("<I", m, pos)[0]
            pos += 4
            name = _GGUF_KEYS.get(key.decode("utf-8", "replace"))
            if name is not None and kind in _SCALAR:
                found[name] = struct.unpack_from(_SCALAR[kind], m, pos)[0]
            pos = skip(kind, pos)
    return found


def _from_hf(path: Path) -> dict:
    cfg = path / "generation_config.json"
    if not cfg.is_file():
        return {}
    d = json.loads(cfg.read_text())
    return {k: d[k] for k in _HF_KEYS if k in d} if isinstance(d, dict) else {}


@lru_cache(maxsize=64)
def model_recommended(path: str, fmt: str) -> dict:
    """Only what the model's files say (may be empty)."""
    try:
        return _clean(_from_gguf(Path(path)) if fmt == "gguf" else _from_hf(Path(path)))
    except Exception as e:  # a model that loads but has odd metadata still serves, with the fallback
        log.warning("cannot read sampling defaults of %s: %s", path, e)
        return {}


def sampling_defaults(path: str, fmt: str) -> dict:
    """llama-server's defaults overlaid with the model's recommended values."""
    return {**LLAMA_SERVER_DEFAULTS, **model_recommended(path, fmt)}
