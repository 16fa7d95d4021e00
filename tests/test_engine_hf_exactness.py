"""Engine logits against transformers on tiny random models, and sharded against unsplit."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from p2pinfer.engine import ModelCatalog, Shard
from tests.engine_helpers import build_tiny_model, reference_logits, run_sharded, step_sharded

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
PROMPT = [
    int(i) for i in np.random.default_rng(1).integers(0, 128, 45)
]  # 45: two prefill chunks, second padded


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def catalog(tiny_models):
    return ModelCatalog([next(iter(tiny_models.values())).parent], include_embedded=False)


@pytest.fixture(scope="module")
def full_shards(catalog):
    return {
        arch: Shard.load(catalog.get(f"tiny-{arch}"), 0, 4, max_sessions=4, max_context=128) for arch in ARCHS
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, full_shards, tiny_models):
    shard = full_shards[arch]
    (logits,) = run_sharded([shard], "exact", PROMPT)
    try:
        assert logits.shape == (128,) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, reference_logits(tiny_models[arch], PROMPT), atol=1e-4, rtol=0)
        seq = list(PROMPT)
        for _ in range(3):  # decode steps continue from the cached prefix
            seq.append(int(np.argmax(logits)))
            logits = step_sharded([shard], "exact", seq[-1])
            np.testing.assert_allclose(logits, reference_logits(tiny_models[arch], seq), atol=1e-4, rtol=0)
    finally:
        shard.close_session("exact")


@pytest.fixture(scope="module")
def llama_splits(catalog):
    entry = catalog.get("tiny-llama")
    return {
        2: [Shard.load(entry, 0, 2, max_context=128), Shard.load(entry, 2, 4, max_context=128)],
        3: [Shard.load(entry, a, b, max_context=128) for a, b in ((0, 1), (1, 3), (3, 4))],
    }


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_matches_unsplit(n_shards, llama_splits, full_shards):
    shards, full = llama_splits[n_shards], [full_shards["llama"]]
    sid = f"split{n_shards}"
    outs = run_sharded(shards, sid, PROMPT)
    (want,) = run_sharded(full, sid, PROMPT)
    try:
        for hop in outs[:-1]:  # the wire format between shards
            assert hop.dtype == np.float32 and hop.shape == (len(PROMPT), 64) and hop.flags.c_contiguous
        np.testing.assert_allclose(outs[-1], want, atol=1e-6, rtol=0)
        for token in (5, 17, 99):
            np.testing.assert_allclose(
                step_sharded(shards, sid, token), step_sharded(full, sid, token), atol=1e-6, rtol=0
            )
    finally:
        for s in [*shards, *full]:
            s.close_session(sid)


def test_interleaved_sessions_keep_their_own_cache(full_shards):
    """Two requests alternating on one shard give what each gives alone (JITs take the cache as input)."""
    shard = full_shards["llama"]
    a, b = PROMPT[:40], PROMPT[5:15]

    def alone(ids, steps):
        out = run_sharded([shard], "alone", ids)
        res = [out[-1]] + [step_sharded([shard], "alone", t) for t in steps]
        shard.close_session("alone")
        return res

    want_a, want_b = alone(a, [3, 4, 5]), alone(b, [7, 8, 9])
    got_a, got_b = [run_sharded([shard], "A", a)[-1]], [run_sharded([shard], "B", b)[-1]]
    for ta, tb in zip([3, 4, 5], [7, 8, 9], strict=True):
        got_b.append(step_sharded([shard], "B", tb))
        got_a.append(step_sharded([shard], "A", ta))
    shard.close_session("A")
    shard.close_session("B")
    for g, w in zip(got_a + got_b, want_a + want_b, strict=True):
        np.testing.assert_array_equal(g, w)


def test_forward_from_worker_threads(full_shards):
    """The server calls forward via trio.to_thread: never concurrently, but from changing non-main threads."""
    shard = full_shards["qwen2"]
    want = run_sharded([shard], "main", PROMPT[:20])[-1]
    want_step = step_sharded([shard], "main", 11)
    shard.close_session("main")
    shard.open_session("threads", 64)
    seen_threads = set()

    def call(x):
        seen_threads.add(threading.current_thread().name)  # idents get reused
        assert threading.current_thread() is not threading.main_thread()
        return shard.forward("threads", x)

    try:
        for _ in range(2):  # a fresh pool each time: a new OS thread per call
            with ThreadPoolExecutor(1) as pool:
                got = pool.submit(call, np.asarray(PROMPT[:20], np.int32)).result()
            with ThreadPoolExecutor(1) as pool:
                got_step = pool.submit(call, np.asarray([11], np.int32)).result()
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got_step, want_step)
            shard.truncate_session("threads", 0)
    finally:
        shard.close_session("threads")
    assert len(seen_threads) >= 2


def test_truncate_then_replay_matches(full_shards):
    shard = full_shards["qwen3"]
    run_sharded([shard], "t", PROMPT[:29])
    want = step_sharded([shard], "t", PROMPT[29])
    step_sharded([shard], "t", 1)
    step_sharded([shard], "t", 2)
    shard.truncate_session("t", 29)
    try:
        np.testing.assert_array_equal(step_sharded([shard], "t", PROMPT[29]), want)
        assert shard.session_position("t") == 30
    finally:
        shard.close_session("t")


def test_catalog_entry_numbers(catalog, full_shards):
    entry = catalog.get("tiny-llama")
    assert (entry.format, entry.arch, entry.n_layers, entry.hidden_size, entry.vocab_size) == (
        "hf",
        "llama",
        4,
        64,
        128,
    )
    assert entry.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4
    shard = full_shards["llama"]
    # the catalog's numbers are what loading allocates (tinygrad may add a few bytes of its own)
    assert entry.shard_bytes(0, 4) <= shard.weight_bytes_allocated <= entry.shard_bytes(0, 4) * 1.01
    assert entry.to_dict()["eos_token_ids"] == list(entry.eos_token_ids)
    assert {e.name for e in catalog.list()} == {f"tiny-{a}" for a in ARCHS}
