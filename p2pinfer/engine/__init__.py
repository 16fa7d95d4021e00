"""Sharded llama-family inference on tinygrad: load a layer range of a model, run sessions through it."""

from .device import configure_tinygrad_device

configure_tinygrad_device()  # must run before anything imports tinygrad

from .catalog import EMBEDDED_MODEL_NAME, ModelCatalog, ModelEntry  # noqa: E402
from .errors import (  # noqa: E402
    ContextLimitError,
    EngineError,
    ModelFileError,
    SessionLimitError,
    UnknownModelError,
    UnknownSessionError,
    UnsupportedModelError,
)
from .sampling import Sampler, SamplingParams  # noqa: E402
from .shard import Shard  # noqa: E402
from .tokenizer import IncrementalDecoder, Tokenizer  # noqa: E402

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
]
