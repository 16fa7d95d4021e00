"""Quantised weights (p2pinfer.engine.quant): qlinear against gguf's own dequantiser, for every type."""

from __future__ import annotations

import numpy as np
import pytest

import p2pinfer.engine  # noqa: F401  (chooses tinygrad's device before tinygrad is imported)
from p2pinfer.engine import quant
from p2pinfer.engine.errors import EngineError, ModelFileError, UnsupportedModelError
from p2pinfer.engine.gguf_loader import _unpermute_rotary
from p2pinfer.engine.quant import SUPPORTED_TYPES, QTensor, dequantize_rows, qlinear

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, quants  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tinygrad import GlobalCounters, Tensor, TinyJit  # noqa: E402

K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf.quants can dequantise these but not quantise them


def _random_raw(qt, n: int, k: int, rng) -> np.ndarray:
    """Valid raw GGUF blocks: random quant bytes, sane fp16 scales."""
    block, bbytes = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (n, k // block, bbytes), dtype=np.uint8)

    def set_f16(off: int) -> None:
        vals = rng.uniform(-0.01, 0.01, (n, k // block)).astype(np.float16)
        raw[..., off : off + 2] = vals[..., None].view(np.uint8)

    for off in {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qt]:
        set_f16(off)
    return raw.reshape(n, -1)


def make_raw(qt, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw as GGUFReader would give it, its float reference from gguf.quants.dequantize)."""
    rng = np.random.default_rng(seed)
    if qt in K_TYPES:
        raw = _random_raw(qt, n, k, rng)
        return raw, quants.dequantize(raw, qt)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if qt == Q.F32:
        return w, w
    # F16: a float16 array; BF16 and the block types: uint8 rows, as GGUFReader exposes them
    raw = quants.quantize(w, qt)
    return raw, quants.dequantize(raw, qt).astype(np.float32)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


# (out, in, T): non-square both ways, decode (T=1) and a small prefill (T=5); K-quants need in % 256 == 0
CASES = ((48, 256, 1), (48, 256, 5), (32, 512, 1))


@pytest.mark.parametrize("qt", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_qlinear_matches_gguf_dequantize(qt):
    for n, k, t in CASES:
        raw, ref_w = make_raw(qt, n, k)
        w = QTensor.from_raw(raw, qt, (n, k))
        assert w.ggml_type == qt and w.shape == (n, k)
        block, bbytes = GGML_QUANT_SIZES[qt]
        assert w.nbytes <= 1.15 * (n * k // block * bbytes)
        x = np.random.default_rng(t).standard_normal((t, k)).astype(np.float32)
        y = qlinear(Tensor(x), w).numpy()
        assert y.shape == (t, n)
        ref = x.astype(np.float64) @ ref_w.astype(np.float64).T
        assert rel_err(y, ref) < 1e-4, (qt.name, n, k, t)
    assert all(quant._KERNELS.values()), "a kernel fell back to tinygrad's own optimisation choices"


@pytest.mark.parametrize("qt", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_rows_roundtrip_and_permutation(qt):
    n, k = 48, 256
    raw, ref_w = make_raw(qt, n, k, seed=1)
    w = QTensor.from_raw(raw, qt, (n, k))
    ids = [5, 0, 47, 5]
    np.testing.assert_array_equal(
        np.asarray(w.raw_rows(ids)).view(np.uint8), np.asarray(raw)[ids].view(np.uint8)
    )
    np.testing.assert_array_equal(w.dequantize_rows(ids), ref_w[ids])
    if qt not in (Q.F32, Q.F16):
        np.testing.assert_array_equal(dequantize_rows(raw, ids, qt), ref_w[ids])
    # llama.cpp's Q/K permutation is undone on the packed bytes, exactly like on the float rows
    perm = _unpermute_rotary(np.arange(n), 3)
    wp = w.take_rows(perm)
    assert wp.nbytes == w.nbytes
    ref_p = _unpermute_rotary(ref_w, 3)
    np.testing.assert_array_equal(wp.dequantize_rows(np.arange(n)), ref_p)
    if qt in (Q.Q4_1, Q.Q6_K):  # and the kernel reads the permuted parts consistently
        x = np.random.default_rng(2).standard_normal((1, k)).astype(np.float32)
        ref = x.astype(np.float64) @ ref_p.astype(np.float64).T
        assert rel_err(qlinear(Tensor(x), wp).numpy(), ref) < 1e-4


def test_one_kernel_no_weight_sized_buffer():
    n, k = 256, 512
    for qt in (Q.Q4_0, Q.Q6_K):
        raw, _ = make_raw(qt, n, k)
        w = QTensor.from_raw(raw, qt, (n, k))
        x = Tensor(np.ones((1, k), np.float32)).realize()
        GlobalCounters.reset()
        qlinear(x, w).realize()
        assert GlobalCounters.kernel_count == 1
        # reads the packed bytes once, never a float32 copy of the weights
        assert GlobalCounters.global_mem < w.nbytes + 4 * (k + n) + 4096


def test_inside_tinyjit():
    n, k = 64, 256
    raw, ref_w = make_raw(Q.Q4_1, n, k)
    w = QTensor.from_raw(raw, Q.Q4_1, (n, k))
    step = TinyJit(lambda x: qlinear(x, w).realize())
    for i in range(4):
        x = np.random.default_rng(i).standard_normal((1, k)).astype(np.float32)
        y = step(Tensor(x)).numpy()
        assert rel_err(y, x.astype(np.float64) @ ref_w.T.astype(np.float64)) < 1e-4


def test_bad_inputs_raise_clear_errors():
    raw, _ = make_raw(Q.Q4_0, 32, 256)
    with pytest.raises(ModelFileError, match="needs 4608 bytes, got 4590"):
        QTensor.from_raw(raw.reshape(-1)[:-18], Q.Q4_0, (32, 256))
    with pytest.raises(ModelFileError, match="multiple of 32"):
        QTensor.from_raw(np.zeros(18 * 10, np.uint8), Q.Q4_0, (12, 15))
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS is not supported"):
        QTensor.from_raw(np.zeros(66, np.uint8), Q.IQ2_XXS, (1, 256))
    assert issubclass(UnsupportedModelError, EngineError)


def test_from_16bit_arrays():
    rng = np.random.default_rng(3)
    w16 = rng.standard_normal((40, 96)).astype(np.float16)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    ref = x.astype(np.float64) @ w16.astype(np.float64).T
    assert rel_err(qlinear(Tensor(x), QTensor.from_float16(w16)).numpy(), ref) < 1e-4
    bf = (w16.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    ref_bf = x.astype(np.float64) @ (bf.astype(np.uint32) << 16).view(np.float32).astype(np.float64).T
    wb = QTensor.from_bfloat16(bf)
    assert wb.ggml_type == Q.BF16 and wb.nbytes == 40 * 96 * 2
    assert rel_err(qlinear(Tensor(x), wb).numpy(), ref_bf) < 1e-4
