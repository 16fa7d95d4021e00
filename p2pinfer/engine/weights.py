"""What every loader provides: the model config plus per-tensor numpy access, restricted to what a shard asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .model_config import ModelConfig


class WeightSource(Protocol):
    path: Path
    config: ModelConfig

    def layer(self, index: int) -> dict[str, np.ndarray]:
        """Canonical names (q, k, v, o, gate, up, down, attn_norm, ffn_norm, [q|k|v]_bias, q_norm, k_norm), HF layout."""
        ...

    def embedding(self) -> np.ndarray: ...

    def final_norm(self) -> np.ndarray: ...

    def lm_head(self) -> np.ndarray:
        """The output projection (vocab, hidden); the embedding matrix when the model ties them."""
        ...

    def close(self) -> None: ...
