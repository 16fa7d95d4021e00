"""min_p, penalties, logprobs in the sampler; a model's recommended sampling values read from its files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from p2pinfer.engine import Sampler, SamplingParams
from p2pinfer.engine.catalog import embedded_model_path
from p2pinfer.engine.generation_defaults import LLAMA_SERVER_DEFAULTS, model_recommended, sampling_defaults

LOGITS = np.array([0.0, 3.0, 2.5, -1.0, 1.0], dtype=np.float32)  # p at T=1: .03 .55 .34 .01 .07


def test_min_p_keeps_tokens_near_the_best():
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0))  # keeps p >= .275: tokens 1 and 2
    assert {s.sample(LOGITS) for _ in range(300)} == {1, 2}
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.1, seed=0))  # .055 too: token 4 as well
    assert {s.sample(LOGITS) for _ in range(1000)} == {1, 2, 4}
    with pytest.raises(ValueError):
        SamplingParams(min_p=1.5)


def test_penalties_push_recent_tokens_down():
    # greedy picks 1; seen once before, a presence penalty of 1 drops it below token 2
    assert Sampler(SamplingParams(presence_penalty=1.0, recent=(1,))).sample(LOGITS) == 2
    assert Sampler(SamplingParams(presence_penalty=0.4, recent=(1,))).sample(LOGITS) == 1
    # frequency: counts matter (seen twice * 0.3 = .6 > .5 gap)
    assert Sampler(SamplingParams(frequency_penalty=0.3, recent=(1,))).sample(LOGITS) == 1
    assert Sampler(SamplingParams(frequency_penalty=0.3, recent=(1, 1))).sample(LOGITS) == 2
    # repetition: positive logits divided (3 / 1.3 < 2.5)
    assert Sampler(SamplingParams(repetition_penalty=1.3, recent=(1,))).sample(LOGITS) == 2
    # the sampler's own tokens join the window
    s = Sampler(SamplingParams(presence_penalty=1.0))
    assert [s.sample(LOGITS) for _ in range(3)] == [1, 2, 1]  # 3-1 > 2.5-1 > 1
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError):
        SamplingParams(frequency_penalty=2.5)


def test_logprobs_are_the_models_distribution():
    s = Sampler(SamplingParams(logprobs=3, presence_penalty=2.0, recent=(1,)))
    tok = s.sample(LOGITS)
    lp = LOGITS.astype(np.float64) - np.log(np.exp(LOGITS.astype(np.float64)).sum())
    assert tok == 2 and s.last_logprob == pytest.approx(lp[2])  # penalised choice, unpenalised logprob
    assert [t for t, _ in s.last_top] == [1, 2, 4]
    assert [v for _, v in s.last_top] == pytest.approx([lp[1], lp[2], lp[4]])
    s = Sampler(SamplingParams(logprobs=0))
    s.sample(LOGITS)
    assert s.last_top == [] and s.last_logprob == pytest.approx(lp[1])
    with pytest.raises(ValueError):
        SamplingParams(logprobs=21)


def test_embedded_model_falls_back_to_llama_server_defaults():
    path = embedded_model_path()
    if path is None:
        pytest.skip("embedded model not installed")
    assert model_recommended(str(path), "gguf") == {}
    assert sampling_defaults(str(path), "gguf") == LLAMA_SERVER_DEFAULTS
    assert LLAMA_SERVER_DEFAULTS["temperature"] == 0.8 and LLAMA_SERVER_DEFAULTS["top_k"] == 40
    assert LLAMA_SERVER_DEFAULTS["top_p"] == 0.95 and LLAMA_SERVER_DEFAULTS["min_p"] == 0.05


def test_gguf_sampling_keys_are_read(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "x")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 1000)  # skipped over, not parsed
    w.add_float32("general.sampling.temp", 0.6)
    w.add_int32("general.sampling.top_k", 20)
    w.add_float32("general.sampling.top_p", 0.9)
    w.add_float32("general.sampling.min_p", 7.0)  # out of range: ignored
    w.add_float32("general.sampling.penalty_repeat", 1.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    got = model_recommended(str(path), "gguf")
    assert got == {"temperature": pytest.approx(0.6), "top_k": 20, "top_p": pytest.approx(0.9),
                   "repetition_penalty": pytest.approx(1.1)}  # fmt: skip
    assert sampling_defaults(str(path), "gguf")["min_p"] == 0.05


def test_generation_config_json_is_read(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "bos_token_id": 1, "min_p": "x"}))  # fmt: skip
    d = sampling_defaults(str(tmp_path), "hf")
    assert (d["temperature"], d["top_p"], d["top_k"], d["min_p"]) == (0.7, 0.8, 20, 0.05)
    other = tmp_path / "none"
    other.mkdir()
    assert sampling_defaults(str(other), "hf") == LLAMA_SERVER_DEFAULTS
