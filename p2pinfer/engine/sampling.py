"""Turning last-position logits into a token id: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # penalties slot in here later (repetition/presence/frequency) and are applied in Sampler.sample
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"bad sampling params: temperature={self.temperature} top_p={self.top_p} top_k={self.top_k}"
            )


class Sampler:
    """Stateful per request: the seeded generator advances token by token, so a seed reproduces a whole run."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.params.stop_token_ids

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits / p.temperature
        order = np.argsort(-scaled, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least the best token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
