"""Synthetic random-weight GGUFs (p2pinfer.engine.synth): the file's layout, and the engine serving it."""

from __future__ import annotations

import numpy as np
import pytest

from p2pinfer.engine import ModelCatalog, Shard, Tokenizer
from p2pinfer.engine.catalog import embedded_model_path
from p2pinfer.engine.synth import write_synthetic_gguf

pytestmark = pytest.mark.skipif(embedded_model_path() is None, reason="needs the embedded SmolLM2 tokenizer")

SHAPE = dict(layers=4, hidden=64, ffn=128, heads=4, kv_heads=2, context=256)
VOCAB = 49152
N_STEPS = 6


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Two models in two dirs (a catalog scan parses every GGUF it finds: the engine tests scan one)."""
    d = tmp_path_factory.mktemp("synth")
    write_synthetic_gguf(d / "q8" / "synth-q8.gguf", qtype="Q8_0", seed=1, tie=True, **SHAPE)
    write_synthetic_gguf(d / "q4" / "synth-q4.gguf", qtype="Q4_0", seed=2, tie=False, **SHAPE)
    return d


@pytest.fixture(scope="module")
def reference_tokenizer_fields():
    import gguf

    ref = gguf.GGUFReader(embedded_model_path())
    return {k: (list(f.types), f.contents()) for k, f in ref.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def q4_entry(models_dir):
    return ModelCatalog([models_dir / "q4"], include_embedded=False).get("synth-q4")


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("name,qtype,tied", [("synth-q8", "Q8_0", True), ("synth-q4", "Q4_0", False)])
def test_layout_matches_llama_cpp_conventions(models_dir, reference_tokenizer_fields, name, qtype, tied):
    import gguf

    r = gguf.GGUFReader(models_dir / name[-2:] / f"{name}.gguf")
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    expect = {
        "llama.block_count": 4,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.vocab_size": VOCAB,
        "llama.rope.dimension_count": 16,
    }
    for key, value in expect.items():
        assert _field(r, key) == value, key
    assert _field(r, "llama.rope.freq_base") == 10000.0
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    for key, (types, value) in reference_tokenizer_fields.items():  # SmolLM2's tokenizer, field for field
        assert key in r.fields, key
        assert list(r.fields[key].types) == types, key
        assert r.fields[key].contents() == value, key

    tensors = {t.name: t for t in r.tensors}
    d, f, kv = 64, 128, 2 * 16
    shapes = {  # HF orientation (rows, cols); GGUF lists dims innermost first
        "token_embd.weight": (VOCAB, d),
        "output_norm.weight": (d,),
    }
    for i in range(4):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (d,),
            b + "ffn_norm.weight": (d,),
            b + "attn_q.weight": (d, d),
            b + "attn_k.weight": (kv, d),
            b + "attn_v.weight": (kv, d),
            b + "attn_output.weight": (d, d),
            b + "ffn_gate.weight": (f, d),
            b + "ffn_up.weight": (f, d),
            b + "ffn_down.weight": (d, f),
        }
    if not tied:
        shapes["output.weight"] = (VOCAB, d)
    assert set(tensors) == set(shapes)
    for tname, shape in shapes.items():
        t = tensors[tname]
        assert tuple(int(x) for x in reversed(t.shape)) == shape, tname
        if len(shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        elif tname == "token_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType[qtype], tname
    w = gguf.quants.dequantize(
        tensors["blk.0.ffn_down.weight"].data, tensors["blk.0.ffn_down.weight"].tensor_type
    )
    assert np.isfinite(w).all() and 0.5 / np.sqrt(f) < w.std() < 2 / np.sqrt(f)


def test_seeded_and_reproducible(tmp_path):
    a = write_synthetic_gguf(tmp_path / "a.gguf", qtype="Q4_1", seed=7, **SHAPE)
    b = write_synthetic_gguf(tmp_path / "b.gguf", qtype="Q4_1", seed=7, **SHAPE)
    c = write_synthetic_gguf(tmp_path / "c.gguf", qtype="Q4_1", seed=8, **SHAPE)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "x.gguf", **{**SHAPE, "hidden": 48})  # not a multiple of 32
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "x.gguf", **{**SHAPE, "kv_heads": 3})
    assert not list(tmp_path.iterdir())


def _greedy(shards, sid: str, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    for s in shards:
        s.open_session(sid, len(ids) + steps + 4)
    x, out, first = np.asarray(ids, np.int32), [], None
    for _ in range(steps):
        for s in shards:
            x = s.forward(sid, x)
        logits = np.asarray(x)
        first = logits if first is None else first
        out.append(int(np.argmax(logits)))
        x = np.asarray(out[-1:], np.int32)
    for s in shards:
        s.close_session(sid)
    return out, first


def test_engine_serves_it_and_shards_agree(q4_entry):
    """Q4_0 matrices and an untied Q4_0 LM head (SmolLM2's own tests cover a tied Q8_0 embedding)."""
    entry = q4_entry
    assert (entry.n_layers, entry.hidden_size, entry.vocab_size) == (4, 64, VOCAB)
    ids = Tokenizer.from_entry(entry).render_chat([{"role": "user", "content": "Hello there"}])

    whole = Shard.load(entry, 0, 4, max_sessions=1, max_context=64)
    one, logits = _greedy([whole], "a", ids, N_STEPS)
    whole.close()
    assert logits.shape == (VOCAB,) and np.isfinite(logits).all()
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-3, "argmax should not be a near tie"
    assert len(set(one)) > 1, "random weights should not just repeat one token"
    parts = [
        Shard.load(entry, 0, 2, max_sessions=1, max_context=64),
        Shard.load(entry, 2, 4, max_sessions=1, max_context=64),
    ]
    two, _ = _greedy(parts, "b", ids, N_STEPS)
    for p in parts:
        p.close()
    assert one == two


def test_tokenizer_chat_template_renders(q4_entry):
    tok = Tokenizer.from_entry(q4_entry)
    text = tok.render_chat_text([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("naïve café 12345")) == "naïve café 12345"
    assert q4_entry.eos_token_ids == (2,)
