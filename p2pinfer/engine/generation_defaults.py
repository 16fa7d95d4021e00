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


def _from_gguf(path: Path) -> dict:
    """The sampling keys of the GGUF header (the lean reader decodes nothing else)."""
    from .gguf_file import GGUFFile

    f = GGUFFile(path)
    try:
        return {name: f.field(key) for key, name in _GGUF_KEYS.items() if key in f.fields}
    finally:
        f.close()


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
