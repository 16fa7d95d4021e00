"""Turning last-position logits into a token id: penalties, greedy or temperature, top-k, top-p, min-p, seeded.

Order (per step): penalties on the logits (over the last `penalty_last_n` tokens, prompt included, as
llama.cpp does), then greedy when temperature is 0, else temperature, top-k, top-p, min-p, draw.
Log-probabilities, when asked for, are those of the model's own distribution (raw logits, before any
penalty or filter), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

PENALTY_LAST_N = 64  # llama.cpp's default window for repetition / frequency / presence penalties
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_p: float = 0.0  # keep tokens with p >= min_p * p(best)
    repetition_penalty: float = 1.0  # HF / llama.cpp: logits of recent tokens divided (>0) or multiplied (<0)
    frequency_penalty: float = 0.0  # OpenAI: minus count * penalty
    presence_penalty: float = 0.0  # OpenAI: minus penalty once a token is present
    logprobs: int | None = None  # None = none; n >= 0: the chosen token's logprob and the n most likely
    recent: tuple[int, ...] = ()  # tokens before the first sampled one (the prompt's tail), for penalties
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "recent", tuple(int(t) for t in self.recent))  # msgpack gives a list
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p <= 1:
            raise ValueError(
                f"bad sampling params: temperature={self.temperature} top_p={self.top_p} "
                f"top_k={self.top_k} min_p={self.min_p}"
            )
        if self.repetition_penalty <= 0 or not -2 <= self.frequency_penalty <= 2 or not -2 <= self.presence_penalty <= 2:
            raise ValueError(
                f"bad penalties: repetition_penalty={self.repetition_penalty} (must be > 0), "
                f"frequency_penalty={self.frequency_penalty}, presence_penalty={self.presence_penalty} (-2..2)"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


SORT_FIRST = 256  # tokens sorted before top_p / min_p without top_k (8x more while they could keep more)


def _best(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values, largest first, ties by index: what a stable argsort of -x
    starts with, without sorting all of x."""
    if k >= x.size:
        return np.argsort(-x, kind="stable")
    kth = np.partition(x, x.size - k)[x.size - k]  # the k-th largest value
    above = np.flatnonzero(x > kth)
    cand = np.concatenate([above, np.flatnonzero(x == kth)[: k - above.size]])
    return cand[np.lexsort((cand, -x[cand]))]


class Sampler:
    """Stateful per request: the seeded generator advances token by token, so a seed reproduces a whole run.

    After each sample(), `last_logprob` holds the chosen token's log-probability and `last_top` the
    `logprobs` most likely tokens as [(id, logprob), ...] (when params.logprobs is set).
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.window: deque[int] = deque(params.recent[-PENALTY_LAST_N:], maxlen=PENALTY_LAST_N)
        self.last_logprob: float | None = None
        self.last_top: list[tuple[int, float]] = []

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.params.stop_token_ids

    def _penalize(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        if not p.penalized or not self.window:
            return logits
        ids, counts = np.unique(np.fromiter(self.window, dtype=np.int64), return_counts=True)
        ok = (ids >= 0) & (ids < logits.size)
        ids, counts = ids[ok], counts[ok]
        logits = logits.copy()
        sel = logits[ids]
        if p.repetition_penalty != 1.0:
            sel = np.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
        sel = sel - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty
        logits[ids] = sel
        return logits

    def _record_logprobs(self, logits: np.ndarray, token: int) -> None:
        n = self.params.logprobs
        if n is None:
            return
        shifted = logits - logits.max()
        logz = np.log(np.exp(shifted).sum())
        lp = shifted - logz
        self.last_logprob = float(lp[token])
        if n:
            top = np.argpartition(-lp, min(n, lp.size - 1))[:n]
            top = top[np.argsort(-lp[top], kind="stable")]
            self.last_top = [(int(i), float(lp[i])) for i in top]
        else:
            self.last_top = []

    def sample(self, logits: np.ndarray) -> int:
        raw = np.asarray(logits, dtype=np.float64).reshape(-1)
        token = self._choose(self._penalize(raw))
        self._record_logprobs(raw, token)
        self.window.append(token)
        return token

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits / p.temperature
        # Tokens by probability, best first (ties: lower id first), but only as many as the cuts can keep:
        # sorting the whole vocabulary took ~10 ms a token (SmolLM2's 49,152), twice a decode step.
        if not p.top_k and p.top_p == 1.0 and p.min_p == 0.0:
            return self._draw_uncut(scaled)
        if p.top_k:
            order = _best(scaled, p.top_k)
            probs = np.exp(scaled[order] - scaled[order[0]])
            probs /= probs.sum()
        else:
            weights = np.exp(scaled - scaled.max())
            total = weights.sum()
            m = SORT_FIRST
            while True:
                order = _best(scaled, m)
                probs = weights[order] / total
                if (order.size == scaled.size or (p.top_p < 1.0 and np.cumsum(probs)[-1] >= p.top_p)
                        or (p.top_p == 1.0 and p.min_p > 0.0 and probs[-1] < p.min_p * probs[0])):  # fmt: skip
                    break  # what the cuts below keep lies within these
                m *= 8
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least the best token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        if p.min_p > 0.0:
            keep = int(np.count_nonzero(probs >= p.min_p * probs[0]))  # probs are sorted: a prefix
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])

    def _draw_uncut(self, scaled: np.ndarray) -> int:
        """Temperature alone: draw first (the one number rng.choice would draw), then sort only as far down
        as the draw reaches; the same pick as choosing over the whole vocabulary sorted."""
        weights = np.exp(scaled - scaled.max())
        total = weights.sum()
        u = self.rng.random()
        m = SORT_FIRST
        while True:
            order = _best(scaled, m)
            cdf = np.cumsum(weights[order]) / total
            if cdf[-1] > u or order.size == scaled.size:
                return int(order[min(int(np.searchsorted(cdf, u, side="right")), order.size - 1)])
            m *= 8
