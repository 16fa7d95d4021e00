"""Sampling: greedy, temperature, top-k, top-p, seeds, stop ids."""

from __future__ import annotations

import numpy as np
import pytest

from p2pinfer.engine import Sampler, SamplingParams

LOGITS = np.array([0.0, 3.0, 2.5, -1.0, 1.0], dtype=np.float32)


def test_greedy_is_argmax():
    assert Sampler(SamplingParams()).sample(LOGITS) == 1


def test_seed_reproduces_a_run():
    s1, s2 = (
        Sampler(SamplingParams(temperature=1.0, seed=7)),
        Sampler(SamplingParams(temperature=1.0, seed=7)),
    )
    assert [s1.sample(LOGITS) for _ in range(50)] == [s2.sample(LOGITS) for _ in range(50)]


def test_top_k_and_top_p_restrict_the_support():
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {s.sample(LOGITS) for _ in range(200)} == {1, 2}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {s.sample(LOGITS) for _ in range(200)} == {1}  # the best token alone holds > 50 % of the mass
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.85, seed=0))  # p = .55, .34, .07, ...
    assert {s.sample(LOGITS) for _ in range(500)} == {1, 2}


def test_temperature_follows_softmax():
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    counts = np.bincount([s.sample(LOGITS) for _ in range(4000)], minlength=5) / 4000
    p = np.exp(LOGITS - LOGITS.max())
    np.testing.assert_allclose(counts, p / p.sum(), atol=0.03)


def test_stop_ids_and_validation():
    s = Sampler(SamplingParams(stop_token_ids=(2, 5)))
    assert s.is_stop(2) and not s.is_stop(1)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
