"""The embedded SmolLM2-135M GGUF: greedy output against transformers' GGUF loader, tokenizer, shard-only memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pinfer.engine import EMBEDDED_MODEL_NAME, ModelCatalog, Shard, Tokenizer

PROMPTS = [  # two chat prompts and two raw continuations
    [{"role": "user", "content": "Explain photosynthesis in one paragraph."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    "The three primary colors are",
    "def fibonacci(n):\n",
]
N_TOKENS = 16


@pytest.fixture(scope="module")
def entry():
    return ModelCatalog([]).get(EMBEDDED_MODEL_NAME)


@pytest.fixture(scope="module")
def tokenizer(entry):
    return Tokenizer.from_entry(entry)


@pytest.fixture(scope="module")
def hf_gguf(entry):
    """transformers dequantizes the GGUF to float32 and runs its own llama: an exact-math reference."""
    import torch
    import transformers

    path = Path(entry.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def prompt_ids(tokenizer, prompt) -> list[int]:
    return tokenizer.render_chat(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)


def test_tokenizer_matches_transformers(tokenizer, hf_gguf):
    _, hf_tok = hf_gguf
    texts = [
        "Hello world!",
        "  spaces\tand\nnewlines 12345",
        "naïve café ☕ 日本語",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        assert tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tokenizer.render_chat(messages) == list(want)
    assert len(want) == 37  # as measured in MODELS.md


def test_incremental_decoder_never_splits_utf8(tokenizer):
    text = "naïve café ☕ 日本語 🙂 done"
    ids = tokenizer.encode(text)
    dec = tokenizer.decoder()
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.slow
def test_greedy_matches_transformers_gguf(entry, tokenizer, hf_gguf):
    import torch

    model, _ = hf_gguf
    shard = Shard.load(entry, 0, entry.n_layers, max_sessions=2, max_context=256)
    try:
        for k, prompt in enumerate(PROMPTS):
            ids = prompt_ids(tokenizer, prompt)
            want, seq = [], list(ids)
            with torch.no_grad():  # plain argmax loop: generate() would stop at EOS or bend logits
                for _ in range(N_TOKENS):
                    want.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                    seq.append(want[-1])
            shard.open_session(f"p{k}", 256)
            got, logits = [], shard.forward(f"p{k}", np.asarray(ids, np.int32))
            for _ in range(N_TOKENS):
                got.append(int(np.argmax(logits)))
                logits = shard.forward(f"p{k}", np.asarray(got[-1:], np.int32))
            shard.close_session(f"p{k}")
            assert got == want, f"prompt {prompt!r}: engine {got} vs transformers {want}"
    finally:
        shard.close()


_MEASURE = """
import gc, json, sys
from p2pinfer.engine import ModelCatalog, Shard, EMBEDDED_MODEL_NAME
def rss():  # anonymous + shared-anonymous memory (tinygrad CPU buffers are MAP_SHARED|MAP_ANON); not file pages
    f = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return sum(int(f[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))
entry = ModelCatalog([]).get(EMBEDDED_MODEL_NAME)
import tinygrad; from tinygrad import Tensor; Tensor([1.0]).realize()  # device up before the baseline
gc.collect(); before = rss()
shard = Shard.load(entry, int(sys.argv[1]), int(sys.argv[2]), warm=False)
gc.collect()
print(json.dumps({"rss": rss() - before, "allocated": shard.weight_bytes_allocated}))
"""


def _measure(start: int, end: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(start), str(end)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shards_hold_only_their_layers_packed(entry):
    """A middle third (10 of 30 layers, no embedding, no head) against the whole model, each loaded in a fresh
    process: memory follows the layers held, and matches the catalog's resident sizes (packed weights)."""
    middle, first, full = _measure(10, 20), _measure(0, 10), _measure(0, entry.n_layers)
    print(f"layers 10-19: {middle}, 0-9: {first}, full: {full}")
    assert middle["allocated"] <= 0.30 * full["allocated"]
    assert middle["rss"] <= 0.35 * full["rss"]
    for (lo, hi), got in (((10, 20), middle), ((0, 10), first), ((0, entry.n_layers), full)):
        assert got["allocated"] == pytest.approx(entry.shard_bytes(lo, hi), rel=0.01)
    # no float32 copy of anything big: what the process gained is the packed weights and little else
    assert full["rss"] <= 1.15 * full["allocated"] + 16 * 2**20
    assert full["allocated"] <= 1.15 * Path(entry.path).stat().st_size
