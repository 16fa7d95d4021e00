"""Sharded llama-family inference on tinygrad: load a layer range of a model, run sessions through it.

    catalog = ModelCatalog([models_dir])          # 'smollm2-135m' (embedded) + *.gguf + HF dirs
    entry = catalog.get("smollm2-135m")           # ModelEntry: sizes for ring election, .to_dict()
    shard = Shard.load(entry, start, end)         # only layers [start, end) (+ embedding / + head)
    shard.open_session(sid, max_tokens)
    y = shard.forward(sid, x)                     # first shard: int32 ids (T,); others: float32 (T, hidden)
                                                  # returns float32 (T, hidden), or (vocab,) logits on the last
    token = Sampler(SamplingParams(...)).sample(y)
    shard.close_session(sid)

Modules: catalog (entries, no tinygrad), gguf_loader / hf_loader (read one tensor at a time),
model_config, model (tinygrad math), quant (packed weights, fused dequant matmuls), runner (a step's
kernels replayed natively on every core), shard (sessions + captured steps), sampling, tokenizer,
device (backend choice, kernel cache), synth (random-weight GGUFs for tests and benchmarks).
Calls into one Shard must be serialised by the caller; any (non-main) thread may make them.
"""

from .catalog import EMBEDDED_MODEL_NAME, ModelCatalog, ModelEntry
from .device import configure, use_kernel_cache
from .errors import (
    ContextLimitError,
    EngineError,
    ModelFileError,
    SessionLimitError,
    UnknownModelError,
    UnknownSessionError,
    UnsupportedModelError,
)
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer


def __getattr__(name: str):
    # Shard imports tinygrad, which must not happen before configure() had its chance to pick the backend
    if name == "Shard":
        from .shard import Shard

        return Shard
    raise AttributeError(f"module 'p2pinfer.engine' has no attribute {name!r}")

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "ContextLimitError",
    "EngineError",
    "IncrementalDecoder",
    "ModelCatalog",
    "ModelEntry",
    "ModelFileError",
    "Sampler",
    "SamplingParams",
    "SessionLimitError",
    "Shard",
    "Tokenizer",
    "UnknownModelError",
    "UnknownSessionError",
    "UnsupportedModelError",
    "configure",
    "use_kernel_cache",
]
