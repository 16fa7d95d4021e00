"""Decode steps that carry several sessions (Shard.forward_rows): each weight read once for all of them, and
every session's output equal, bit for bit, to what it gets alone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from p2pinfer.engine import EMBEDDED_MODEL_NAME, ModelCatalog, Shard, Tokenizer
from p2pinfer.engine.errors import ContextLimitError, UnknownSessionError

PROMPTS = ["The three primary colors are", "def fibonacci(n):\n", "Paris is the capital of", "1, 2, 3,"]
STEPS = 6


@pytest.fixture(scope="module")
def entry():
    return ModelCatalog([]).get(EMBEDDED_MODEL_NAME)


@pytest.fixture(scope="module")
def prompts(entry):
    tok = Tokenizer.from_entry(entry)
    return [tok.encode(p) for p in PROMPTS]


def _decode(shards: list[Shard], prompts: list[list[int]], rows: bool) -> list[list[np.ndarray]]:
    """Greedy decode of every prompt through `shards` (a split model), one session per prompt; rows=True
    steps all sessions together, else one after another. Returns each session's logits per step."""
    tag = "rows" if rows else "alone"
    sids = [f"{tag}-{i}" for i in range(len(prompts))]
    for sh in shards:
        for sid in sids:
            sh.open_session(sid, 64)
    logits = [[] for _ in prompts]
    nxt = []
    for i, (sid, ids) in enumerate(zip(sids, prompts, strict=True)):
        x = np.asarray(ids, dtype=np.int64)
        for sh in shards:
            x = sh.forward(sid, x)
        logits[i].append(x)
        nxt.append(int(np.argmax(x)))
    for _ in range(STEPS):
        xs = [np.asarray([t], dtype=np.int64) for t in nxt]
        for sh in shards:
            if rows:
                out = sh.forward_rows(list(zip(sids, xs, strict=True)))
                assert not any(isinstance(o, Exception) for o in out), out
                xs = out
            else:
                xs = [sh.forward(sid, x) for sid, x in zip(sids, xs, strict=True)]
        for i, x in enumerate(xs):
            logits[i].append(x)
        nxt = [int(np.argmax(x)) for x in xs]
    for sh in shards:
        for sid in sids:
            sh.close_session(sid)
    return logits


@pytest.mark.parametrize("split", [(30,), (11, 30)], ids=["whole", "two-shards"])
def test_rows_equal_each_session_alone_bit_for_bit(entry, prompts, split):
    bounds = [0, *split]
    shards = [Shard.load(entry, a, b, max_context=512, warm=False) for a, b in itertools.pairwise(bounds)]
    assert all(sh.rows_exact for sh in shards)  # Q4_1 matrices, a Q8_0 head
    try:
        for n in (2, 3, len(prompts)):  # 3: a step with a spare row
            alone = _decode(shards, prompts[:n], rows=False)
            together = _decode(shards, prompts[:n], rows=True)
            for a, t in zip(alone, together, strict=True):
                for step, (x, y) in enumerate(zip(a, t, strict=True)):
                    assert x.shape == y.shape and np.array_equal(x, y), (n, step, np.abs(x - y).max())
    finally:
        for sh in shards:
            sh.close()


def test_a_bad_item_fails_alone(entry):
    sh = Shard.load(entry, 0, 30, max_context=512, warm=False)
    try:
        sh.open_session("ok", 8)
        sh.open_session("full", 1)
        sh.forward("full", np.asarray([1], dtype=np.int64))  # its one position is used
        sh.forward("ok", np.asarray([1], dtype=np.int64))
        one = np.asarray([2], dtype=np.int64)
        out = sh.forward_rows([("ok", one), ("missing", one), ("full", one), ("ok", one)])
        assert isinstance(out[0], np.ndarray) and out[0].shape == (entry.vocab_size,)
        assert isinstance(out[1], UnknownSessionError)
        assert isinstance(out[2], ContextLimitError)
        assert "twice" in str(out[3])
        assert sh.session_position("ok") == 2 and sh.session_position("full") == 1
    finally:
        sh.close()


def test_steps_of_different_sessions_alternate_on_one_plan(entry, prompts):
    """A plan re-points its KV slots when the sessions of a step change (and only then)."""
    sh = Shard.load(entry, 0, 30, max_context=512, warm=False)
    try:
        groups = [("p0", "p1"), ("q0", "q1")]
        for sid, ids in zip([s for g in groups for s in g], prompts, strict=True):
            sh.open_session(sid, 64)
            sh.open_session(sid + "-alone", 64)
            sh.forward(sid, np.asarray(ids))
            sh.forward(sid + "-alone", np.asarray(ids))
        one = np.asarray([5], dtype=np.int64)
        for _ in range(3):
            for g in groups:
                together = sh.forward_rows([(sid, one) for sid in g])
                for sid, y in zip(g, together, strict=True):
                    assert np.array_equal(sh.forward(sid + "-alone", one), y), sid
    finally:
        sh.close()


def test_without_exact_row_kernels_sessions_step_one_by_one(tmp_path):
    """Float matrices (as K-quants) have no native kernel for a few rows: tinygrad's may sum a row of
    several in another order, so forward_rows runs the sessions one by one, and still answers alike."""
    from p2pinfer.engine.synth import write_synthetic_gguf

    write_synthetic_gguf(tmp_path / "f16" / "synth-f16.gguf", qtype="F16", seed=3, layers=2, hidden=64, ffn=128,
                         heads=4, kv_heads=2, context=256)  # fmt: skip
    entry = ModelCatalog([tmp_path / "f16"], include_embedded=False).get("synth-f16")
    sh = Shard.load(entry, 0, 2, max_context=128, warm=False)
    try:
        assert sh.rows_exact is False
        for sid in ("a", "b", "a-alone", "b-alone"):
            sh.open_session(sid, 16)
            sh.forward(sid, np.asarray([1, 2, 3]))
        one = np.asarray([4], dtype=np.int64)
        together = sh.forward_rows([("a", one), ("b", one)])
        assert np.array_equal(together[0], sh.forward("a-alone", one))
        assert np.array_equal(together[1], sh.forward("b-alone", one))
    finally:
        sh.close()
