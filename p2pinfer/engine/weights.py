"""What every loader provides: the model config plus per-tensor numpy access, restricted to what a shard asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .model_config import ModelConfig


class EmbeddingTable:
    """Token id -> hidden row lookup, kept on the host in the file's own encoding.

    The first shard only ever gathers a few rows per step, so a quantized table (GGUF Q8_0: ~1 byte per
    weight) is dequantized row by row instead of holding a float32 copy of the whole vocabulary.
    """

    def __init__(self, rows: np.ndarray, dequantize_rows=None):
        self.rows = rows  # (vocab, hidden) float32, or (vocab, bytes per row) raw quantized blocks
        self._dequantize = dequantize_rows

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        picked = self.rows[ids]
        out = picked if self._dequantize is None else self._dequantize(picked)
        return np.ascontiguousarray(out, dtype=np.float32)


class WeightSource(Protocol):
    path: Path
    config: ModelConfig

    def layer(self, index: int) -> dict[str, np.ndarray]:
        """Canonical names (q, k, v, o, gate, up, down, attn_norm, ffn_norm, [q|k|v]_bias, q_norm, k_norm), HF layout."""
        ...

    def embedding_table(self) -> EmbeddingTable: ...

    def final_norm(self) -> np.ndarray: ...

    def lm_head(self) -> np.ndarray:
        """The output projection (vocab, hidden); the embedding matrix when the model ties them."""
        ...

    def close(self) -> None: ...
