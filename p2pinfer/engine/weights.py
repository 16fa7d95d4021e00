"""What every loader provides: the model config, weight matrices in their file encoding, small vectors as numpy.

No tinygrad here: the catalog sizes models with `resident_nbytes` without loading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .model_config import ModelConfig

# Resident bytes per block of each encoding as engine/quant.py lays it out in memory, and values per block.
# The file's fp16 block scales are widened to float32 where that keeps kernels fast (see quant.py), so a
# few types hold slightly more than the file: Q4_0 20 vs 18 bytes per 32 values, Q4_1 22 vs 20, ...
_RESIDENT_BLOCK = {
    "F32": (4, 1),
    "F16": (2, 1),
    "BF16": (2, 1),
    "Q4_0": (20, 32),
    "Q4_1": (22, 32),
    "Q5_0": (24, 32),
    "Q5_1": (26, 32),
    "Q8_0": (36, 32),
    "Q4_K": (152, 256),
    "Q5_K": (184, 256),
    "Q6_K": (212, 256),
}


def resident_nbytes(type_name: str, n_elements: int) -> int:
    """Bytes a weight of this encoding occupies once loaded (unknown types: float32, the loader refuses them)."""
    block_bytes, block = _RESIDENT_BLOCK.get(type_name, (4, 1))
    return n_elements // block * block_bytes


class WeightSource(Protocol):
    path: Path
    config: ModelConfig

    def layer(self, index: int) -> dict:
        """Canonical names (q, k, v, o, gate, up, down as QTensor; attn_norm, ffn_norm, [q|k|v]_bias, q_norm,
        k_norm as float32 numpy), HF layout."""
        ...

    def layer_nbytes(self, index: int) -> int: ...

    def embedding(self):
        """The token embedding matrix (vocab, hidden) as a QTensor; lm_head() returns the same object when tied."""
        ...

    def embedding_nbytes(self) -> int: ...

    def head_nbytes(self) -> int: ...

    def final_norm(self) -> np.ndarray: ...

    def lm_head(self):
        """The output projection (vocab, hidden) as a QTensor."""
        ...

    def close(self) -> None: ...
