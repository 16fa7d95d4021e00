"""Bad input gives an EngineError that names the file or the limit, never a bare traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from p2pinfer.engine import (
    ContextLimitError,
    EngineError,
    ModelCatalog,
    ModelEntry,
    ModelFileError,
    SessionLimitError,
    Shard,
    UnknownModelError,
    UnknownSessionError,
    UnsupportedModelError,
)
from p2pinfer.engine.catalog import describe, embedded_model_path
from tests.engine_helpers import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("err-models"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def tiny_shard(tiny_dir):
    entry = describe(tiny_dir, "tiny")
    return Shard.load(entry, 0, 2, max_sessions=2, max_context=64)


def test_unknown_model_lists_known_names():
    cat = ModelCatalog([], include_embedded=False)
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        cat.get("nope")


def test_missing_and_corrupt_gguf(tmp_path):
    with pytest.raises(ModelFileError, match="missing.gguf"):
        describe(tmp_path / "missing.gguf", "x")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 50)
    with pytest.raises(ModelFileError, match="bad.gguf"):
        describe(bad, "x")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(embedded_model_path().read_bytes()[:1_000_000])
    with pytest.raises(ModelFileError, match="truncated.gguf"):
        describe(truncated, "x")


def test_catalog_skips_broken_files_and_says_why(tmp_path, tiny_dir):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    shutil.copytree(tiny_dir, tmp_path / "good")
    cat = ModelCatalog([tmp_path], include_embedded=False)
    assert [e.name for e in cat.list()] == ["good"]
    assert any("junk.gguf" in p for p in cat.problems)


def test_unknown_architecture(tmp_path, tiny_dir):
    d = tmp_path / "weird"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        describe(d, "weird")


def test_corrupt_safetensors_names_file(tmp_path, tiny_dir):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFileError, match="model.safetensors"):
        describe(d, "corrupt")


def test_missing_tensor_file_named_at_load(tmp_path, tiny_dir):
    d = tmp_path / "vanishing"
    shutil.copytree(tiny_dir, d)
    entry = describe(d, "vanishing")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="vanishing: no .*safetensors"):
        Shard.load(entry, 0, 1, warm=False)


def test_unsupported_quant_type_named(tmp_path):
    """A real GGUF whose layer matrix is Q2_K (a type the kernels do not run): one sentence naming both."""
    import gguf

    from p2pinfer.engine.gguf_loader import GGUFSource

    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 256),
                       ("feed_forward_length", 256), ("attention.head_count", 4)):  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", 8)
    q2k_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K][1]
    w.add_tensor("blk.0.attn_q.weight", np.zeros((256, q2k_block), np.uint8),
                 raw_shape=(256, q2k_block), raw_dtype=gguf.GGMLQuantizationType.Q2_K)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = GGUFSource(path)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.weight.*Q2_K"):
        src.layer(0)


def test_bad_layer_range(tiny_dir):
    entry = describe(tiny_dir, "tiny")
    with pytest.raises(EngineError, match=r"\[1, 5\)"):
        Shard.load(entry, 1, 5)


def test_context_limits(tiny_shard):
    with pytest.raises(ContextLimitError, match="64"):
        tiny_shard.open_session("long", 65)
    tiny_shard.open_session("s", 10)
    try:
        with pytest.raises(ContextLimitError, match="limit of 10"):
            tiny_shard.forward("s", np.arange(11, dtype=np.int32))
        tiny_shard.forward("s", np.arange(10, dtype=np.int32))
        with pytest.raises(ContextLimitError):
            tiny_shard.forward("s", np.array([1], np.int32))
    finally:
        tiny_shard.close_session("s")


def test_session_budget(tiny_shard):
    tiny_shard.open_session("a", 8)
    tiny_shard.open_session("b", 8)
    try:
        with pytest.raises(SessionLimitError, match="2 sessions"):
            tiny_shard.open_session("c", 8)
    finally:
        tiny_shard.close_session("a")
        tiny_shard.close_session("b")
    with pytest.raises(UnknownSessionError, match="'a'"):
        tiny_shard.forward("a", np.array([1], np.int32))


def test_kv_memory_budget(tiny_dir):
    entry = describe(tiny_dir, "tiny")
    shard = Shard.load(entry, 1, 2, max_context=64, warm=False)
    shard.kv_budget_bytes = int(1.5 * shard.kv_bytes_per_session)
    shard.open_session("a", 8)
    with pytest.raises(SessionLimitError, match="KV budget"):
        shard.open_session("b", 8)


def test_bad_forward_inputs(tiny_shard):
    tiny_shard.open_session("bad", 16)
    try:
        with pytest.raises(EngineError, match="token id out of range"):
            tiny_shard.forward("bad", np.array([100000], np.int32))
        with pytest.raises(EngineError, match="token ids"):
            tiny_shard.forward("bad", np.zeros((2, 64), np.float32))
    finally:
        tiny_shard.close_session("bad")


def test_entry_roundtrip_and_shard_bytes(tiny_dir):
    entry = describe(tiny_dir, "tiny")
    assert ModelEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry
    assert entry.shard_bytes(0, 2) == entry.shard_bytes(0, 1) + entry.shard_bytes(1, 2)
    with pytest.raises(ValueError):
        entry.shard_bytes(1, 1)
