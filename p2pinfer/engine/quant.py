"""Weights kept in their GGUF encoding in memory; dequantised inside the matmul kernel.

    w = QTensor.from_raw(reader.tensors[i].data, reader.tensors[i].tensor_type, (out_features, in_features))
    w = QTensor.from_float16(arr) / QTensor.from_bfloat16(bits) / QTensor.from_float32(arr)   # safetensors
    w = w.take_rows(perm)                 # e.g. undo llama.cpp's Q/K row permutation: a copy of packed bytes
    y = qlinear(x, w)                     # x float32 (T, in) -> (T, out) = x @ dequant(w).T: ONE kernel, lazy
    rows = w.dequantize_rows(ids)         # float32 (len(ids), in) on the host (embedding gather, tied head)
    w.raw_rows(ids), w.numpy_parts()      # GGUF bytes of some rows / zero-copy numpy views of the parts
    w.ggml_type, w.shape, w.nbytes (resident), w.raw_nbytes (in the file)

Types: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K F16 BF16 F32; others raise UnsupportedModelError, a wrong
byte count ModelFileError. A QTensor holds a few realized tinygrad tensors ("parts") written once, straight
from the GGUF bytes through numpy views of the tinygrad buffers (no float32 copy of the matrix ever exists).
Per type the parts are the file's blocks split by field: quant bytes unchanged, fp16 block scales widened to
float32 where the resident size stays <= 1.11x the file's (Q4_1/Q5_1 keep their fp16 min; K-quants keep
float32 d/dmin with the 6-bit sub-scales unpacked to a byte each; F16/BF16 stay 16-bit as uint16).

The matvec is written "lanes-last" (see /work/shared/ENGINE.md): the product is shaped
(T, out, *block axes, 16 lanes), summed over the block axes first, then over the lanes, so the kernel keeps
independent accumulators. tinygrad's own optimiser upcasts 3-4 output rows of such a matvec, which made these
kernels 5-15x slower on CPU; so qlinear schedules the expression once per (type, shape, T) and re-issues the
kernel through Tensor.custom_kernel with explicit options (see _kernel_opts): one row per iteration, the lanes
unrolled, T upcast by 4 for prefill, output rows split over core_id threads. Some choices differ for
tinygrad's LLVM and clang backends (measured, see benchmarks/quant.py); if building the explicit kernel ever
fails (tinygrad internals), qlinear warns once and falls back to the plain expression.

Q4_0, Q4_1 and Q8_0 (the types of llama.cpp's common GGUFs) go one step further: the kernel tinygrad generates
for them reached 2-9 GB/s from DRAM, so its body is replaced by hand-written C (native.py: vector extensions,
AVX-512 table permutes, prefetch) with the same signature and slices: 20-29 GB/s on 2 threads here, i.e. the
memory bandwidth (`python benchmarks/quant.py --native`). Q4_K and Q6_K have native decode (T=1) bodies too
(12-17 GB/s); their prefill and the other types keep tinygrad's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .device import ensure_configured

ensure_configured()  # tinygrad reads DEV once, at import: the engine's choice unless configure() ran first
from tinygrad import Device, Tensor, dtypes

from . import native
from .errors import ModelFileError, UnsupportedModelError

Q = GGMLQuantizationType

SUPPORTED_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32)

_NP_TO_TG = {
    np.dtype(np.uint8): dtypes.uint8,
    np.dtype(np.int8): dtypes.int8,
    np.dtype(np.uint16): dtypes.uint16,
    np.dtype(np.float16): dtypes.float16,
    np.dtype(np.float32): dtypes.float32,
}


def _new_part(shape: tuple[int, ...], np_dtype, device: str) -> tuple[Tensor, np.ndarray]:
    """A realized tinygrad buffer and a writable zero-copy numpy view of its memory."""
    np_dtype = np.dtype(np_dtype)
    t = Tensor.empty(*shape, dtype=_NP_TO_TG[np_dtype], device=device)
    buf = t.uop.buffer
    buf.ensure_allocated()
    view = np.frombuffer(buf.as_memoryview(force_zero_copy=True), dtype=np_dtype).reshape(shape)
    return t, view


def _fill(parts: dict, name: str, src: np.ndarray, np_dtype, device: str) -> None:
    t, view = _new_part(src.shape, np_dtype, device)
    view[...] = src  # the only copy: file bytes (mmap) -> tinygrad memory, block by block in numpy's loop
    parts[name] = t


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block, as an (..,) float16 array (a small strided copy)."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0]


@dataclass(eq=False)
class QTensor:
    """A (out_features, in_features) weight matrix held in (near) its GGUF encoding as tinygrad CPU tensors."""

    ggml_type: GGMLQuantizationType
    shape: tuple[int, int]
    parts: dict[str, Tensor] = field(repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_raw(
        cls, raw: np.ndarray, ggml_type, shape: tuple[int, int], device: str | None = None
    ) -> QTensor:
        """Build from a GGUF tensor's data as GGUFReader exposes it (uint8 rows for block types and BF16)."""
        try:
            qt = Q(int(ggml_type))
        except ValueError:
            qt = None
        if qt not in SUPPORTED_TYPES:
            name = qt.name if qt is not None else str(ggml_type)
            supported = ", ".join(t.name for t in SUPPORTED_TYPES)
            raise UnsupportedModelError(
                f"GGUF tensor type {name} is not supported by the quantised kernels (supported: {supported})"
            )
        n, k = (int(s) for s in shape)
        block, bbytes = GGML_QUANT_SIZES[qt]
        if n <= 0 or k <= 0 or k % block:
            raise ModelFileError(
                f"a {qt.name} tensor of shape {(n, k)} is invalid: rows must be a multiple of {block} values"
            )
        raw = np.asarray(raw)
        expect = n * (k // block) * bbytes
        if raw.nbytes != expect:
            raise ModelFileError(
                f"{qt.name} tensor of shape {(n, k)} needs {expect} bytes, got {raw.nbytes} (truncated or corrupt)"
            )
        if not raw.flags.c_contiguous:
            raw = np.ascontiguousarray(raw)
        device = device or Device.DEFAULT
        parts: dict[str, Tensor] = {}
        if qt in (Q.F32, Q.F16, Q.BF16):
            # 16-bit floats are kept as their bit patterns (uint16) and widened in the kernel (see qlinear_expr)
            np_dtype = {Q.F32: np.float32, Q.F16: np.uint16, Q.BF16: np.uint16}[qt]
            _fill(parts, "w", raw.reshape(-1).view(np.uint8).view(np_dtype).reshape(n, k), np_dtype, device)
            return cls(qt, (n, k), parts)
        b = raw.reshape(-1).view(np.uint8).reshape(n, k // block, bbytes)
        if qt == Q.Q4_0:
            _fill(parts, "d", _f16(b, 0), np.float32, device)
            _fill(parts, "qs", b[..., 2:], np.uint8, device)
        elif qt == Q.Q4_1:
            _fill(parts, "d", _f16(b, 0), np.float32, device)
            _fill(parts, "m", _f16(b, 2), np.float16, device)
            _fill(parts, "qs", b[..., 4:], np.uint8, device)
        elif qt == Q.Q5_0:
            _fill(parts, "d", _f16(b, 0), np.float32, device)
            _fill(parts, "qh", b[..., 2:6], np.uint8, device)
            _fill(parts, "qs", b[..., 6:], np.uint8, device)
        elif qt == Q.Q5_1:
            _fill(parts, "d", _f16(b, 0), np.float32, device)
            _fill(parts, "m", _f16(b, 2), np.float16, device)
            _fill(parts, "qh", b[..., 4:8], np.uint8, device)
            _fill(parts, "qs", b[..., 8:], np.uint8, device)
        elif qt == Q.Q8_0:
            _fill(parts, "d", _f16(b, 0), np.float32, device)
            _fill(parts, "qs", b[..., 2:].view(np.int8), np.int8, device)
        elif qt in (Q.Q4_K, Q.Q5_K):
            dm = np.stack([_f16(b, 0), _f16(b, 2)], axis=-1)  # (n, nsb, 2): d, dmin
            _fill(parts, "dm", dm, np.float32, device)
            _fill(parts, "scm", _unpack_k_scales(b[..., 4:16]), np.uint8, device)
            if qt == Q.Q5_K:
                _fill(parts, "qh", b[..., 16:48], np.uint8, device)
                _fill(parts, "qs", b[..., 48:].reshape(n, k // block, 4, 32), np.uint8, device)
            else:
                _fill(parts, "qs", b[..., 16:].reshape(n, k // block, 4, 32), np.uint8, device)
        elif qt == Q.Q6_K:
            _fill(parts, "d", _f16(b, 208), np.float32, device)
            _fill(parts, "sc", b[..., 192:208].view(np.int8), np.int8, device)
            _fill(parts, "ql", b[..., :128].reshape(n, k // block, 2, 2, 32), np.uint8, device)
            _fill(parts, "qh", b[..., 128:192].reshape(n, k // block, 2, 32), np.uint8, device)
        return cls(qt, (n, k), parts)

    @classmethod
    def from_float16(cls, w: np.ndarray, device: str | None = None) -> QTensor:
        """A float16 matrix (e.g. from safetensors) kept 16-bit."""
        w = np.asarray(w)
        if w.dtype != np.float16 or w.ndim != 2:
            raise ValueError(f"from_float16 wants a 2-D float16 array, got {w.dtype} {w.shape}")
        return cls.from_raw(w, Q.F16, w.shape, device)

    @classmethod
    def from_bfloat16(
        cls, w: np.ndarray, shape: tuple[int, int] | None = None, device: str | None = None
    ) -> QTensor:
        """A bfloat16 matrix given as its raw 16-bit patterns (uint16/uint8 array, or a ml_dtypes bfloat16 array)."""
        w = np.asarray(w)
        if shape is None:
            if w.dtype.itemsize != 2 or w.ndim != 2:
                raise ValueError(
                    f"from_bfloat16 wants a 2-D 16-bit array (or pass shape), got {w.dtype} {w.shape}"
                )
            shape = w.shape
        return cls.from_raw(w.view(np.uint8) if w.dtype.itemsize == 2 else w, Q.BF16, shape, device)

    @classmethod
    def from_float32(cls, w: np.ndarray, device: str | None = None) -> QTensor:
        w = np.asarray(w, dtype=np.float32)
        return cls.from_raw(w, Q.F32, w.shape, device)

    # ------------------------------------------------------------------ properties
    @property
    def nbytes(self) -> int:
        """Resident bytes of all the parts."""
        return sum(t.nbytes() for t in self.parts.values())

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the same matrix in the GGUF file."""
        block, bbytes = GGML_QUANT_SIZES[self.ggml_type]
        return self.shape[0] * (self.shape[1] // block) * bbytes

    @property
    def device(self) -> str:
        return next(iter(self.parts.values())).device

    def numpy_parts(self) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of the parts (rows first). Don't write to them while a kernel may run.
        Made once per QTensor (the parts never change): the embedding gathers rows through them every token."""
        cached = self.__dict__.get("_numpy_parts")
        if cached is not None:
            return dict(cached)
        out = {}
        for name, t in self.parts.items():
            buf = t.uop.buffer
            np_dtype = next(k for k, v in _NP_TO_TG.items() if v == t.dtype)
            mv = buf.as_memoryview(force_zero_copy=True)
            out[name] = np.frombuffer(mv, dtype=np_dtype).reshape(t.shape)
        self.__dict__["_numpy_parts"] = out
        return dict(out)

    # ------------------------------------------------------------------ row operations (host side)
    def take_rows(self, perm) -> QTensor:
        """A new QTensor whose row i is row perm[i] of this one: a copy of the packed bytes, no dequantise."""
        perm = np.asarray(perm, dtype=np.int64).reshape(-1)
        if perm.size and (perm.min() < 0 or perm.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        parts = {}
        for name, view in self.numpy_parts().items():
            t, dst = _new_part((perm.size, *view.shape[1:]), view.dtype, self.device)
            np.take(view, perm, axis=0, out=dst)
            parts[name] = t
        return QTensor(self.ggml_type, (int(perm.size), self.shape[1]), parts)

    def raw_rows(self, ids) -> np.ndarray:
        """The GGUF encoding of rows `ids`: uint8 (len(ids), bytes per row) (typed array for F32/F16)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        p = {name: v[ids] for name, v in self.numpy_parts().items()}
        qt, (n, k) = self.ggml_type, (ids.size, self.shape[1])
        if qt == Q.F32:
            return p["w"]
        if qt == Q.F16:
            return p["w"].view(np.float16)
        if qt == Q.BF16:
            return p["w"].view(np.uint8)
        block, bbytes = GGML_QUANT_SIZES[qt]
        out = np.empty((n, k // block, bbytes), dtype=np.uint8)

        def put_f16(off: int, vals: np.ndarray) -> None:
            out[..., off : off + 2] = vals.astype(np.float16)[..., None].view(np.uint8)

        if qt in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_1, Q.Q5_1):
            put_f16(0, p["d"])
            off = 2
            if "m" in p:
                put_f16(2, p["m"])
                off = 4
            if "qh" in p:
                out[..., off : off + 4] = p["qh"]
                off += 4
            out[..., off:] = p["qs"].view(np.uint8)
        elif qt in (Q.Q4_K, Q.Q5_K):
            put_f16(0, p["dm"][..., 0])
            put_f16(2, p["dm"][..., 1])
            out[..., 4:16] = _pack_k_scales(p["scm"])
            if qt == Q.Q5_K:
                out[..., 16:48] = p["qh"]
                out[..., 48:] = p["qs"].reshape(n, k // block, 128)
            else:
                out[..., 16:] = p["qs"].reshape(n, k // block, 128)
        elif qt == Q.Q6_K:
            out[..., :128] = p["ql"].reshape(n, k // block, 128)
            out[..., 128:192] = p["qh"].reshape(n, k // block, 64)
            out[..., 192:208] = p["sc"].view(np.uint8)
            put_f16(208, p["d"])
        return out.reshape(n, -1)

    def dequantize_rows(self, ids) -> np.ndarray:
        """float32 (len(ids), in_features): rows `ids` dequantised on the host, e.g. embeddings (every decode
        step gathers one): Q8_0 (the usual embedding type) straight from the parts, 5x faster than re-encoding
        the rows for gguf.quants; other types through dequantize_rows."""
        if self.ggml_type == Q.Q8_0:
            p, ids = self.numpy_parts(), np.asarray(ids, dtype=np.int64).reshape(-1)
            return (p["d"][ids][..., None] * p["qs"][ids]).reshape(ids.size, self.shape[1])
        return dequantize_rows(self, ids)


def dequantize_rows(w, ids, ggml_type=None) -> np.ndarray:
    """Rows `ids` of a QTensor, or of raw GGUF rows (uint8 (rows, bytes) + ggml_type), as float32."""
    from gguf import quants

    if isinstance(w, QTensor):
        raw, qt = w.raw_rows(ids), w.ggml_type
    else:
        raw, qt = np.asarray(w)[np.asarray(ids, dtype=np.int64).reshape(-1)], Q(int(ggml_type))
    if qt in (Q.F32, Q.F16):
        return np.asarray(raw, dtype=np.float32)
    if qt == Q.BF16:
        return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return quants.dequantize(raw, qt)


def _unpack_k_scales(s: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte packed 6-bit scales/mins (.., 12) -> uint8 (.., 2, 8): [sc0..7], [mn0..7]."""
    s = s.astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return np.stack([sc, mn], axis=-2)


def _pack_k_scales(scm: np.ndarray) -> np.ndarray:
    sc, mn = scm[..., 0, :].astype(np.uint8), scm[..., 1, :].astype(np.uint8)
    out = np.empty((*scm.shape[:-2], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    return out


# ---------------------------------------------------------------------- the kernels (lazy expressions)
def _lanes_last(p: Tensor, n_block_axes: int, n_lane_axes: int) -> Tensor:
    """p: (T, N, *blocks, *lanes) -> (T, N): reduce the block axes first, then the lanes."""
    blocks = tuple(range(2, 2 + n_block_axes))
    p = p.sum(axis=blocks)
    return p.sum(axis=tuple(range(2, 2 + n_lane_axes)))


def _shifts(shape: tuple[int, ...], axis: int, mult: int = 1, add: int = 0) -> Tensor:
    """uint8 shift amounts mult*i+add along `axis`: a STACK of constants (a select on the index in the kernel,
    constant once the axis is unrolled; no buffer, and unlike Tensor.arange no reduce the scheduler may split)."""
    n = shape[axis]
    vec = Tensor.const(tuple(mult * i + add for i in range(n)), dtypes.uint8)
    view = [1] * len(shape)
    view[axis] = n
    return vec.reshape(view)


def qlinear(x: Tensor, w: QTensor) -> Tensor:
    """x (T, in) float32 -> (T, out) float32 = x @ dequant(w).T: one fused kernel, lazy (works inside TinyJit).

    The kernel is the lazy expression of `qlinear_expr`, scheduled once per (type, shape, T) and re-issued
    through Tensor.custom_kernel with explicit optimisations (see `_kernel_opts`): tinygrad's CPU heuristic
    upcasts 3-4 output rows of a matvec, which makes these kernels 5-10x slower than one row per iteration.
    """
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"qlinear: x has shape {x.shape}, weight is {w.shape} (out, in)")
    if x.dtype != dtypes.float32:
        x = x.cast(dtypes.float32)
    t = x.shape[0]
    if USE_CUSTOM_KERNEL and isinstance(t, int):
        key = (w.ggml_type, w.shape, t, w.device, tuple((n, v.shape, v.dtype) for n, v in w.parts.items()))
        kern = _KERNELS.get(key)
        if kern is None:
            try:
                kern = _KERNELS[key] = _build_kernel(w, t)
            except Exception as e:  # a tinygrad internals change: keep working with the heuristic's kernel
                _KERNELS[key] = kern = False
                import warnings

                warnings.warn(
                    f"qlinear: explicit kernel options unavailable ({e!r}); using tinygrad's", stacklevel=2
                )
        if kern:
            ast, slots = kern
            srcs = [
                Tensor.empty(t * w.shape[0], dtype=dtypes.float32, device=w.device)
                if name == "_out"
                else (x if name == "_x" else w.parts[name]).flatten()
                for name in slots
            ]
            outs = Tensor.custom_kernel(*srcs, fxn=lambda *_: ast)
            return outs[slots.index("_out")].reshape(t, w.shape[0])
    return qlinear_expr(x, w)


USE_CUSTOM_KERNEL = True
USE_NATIVE = True  # T=1 Q4_0/Q4_1/Q8_0: hand-written C bodies (native.py)
_KERNELS: dict = {}


def _build_kernel(w: QTensor, t: int):
    """Schedule qlinear_expr on placeholder tensors; return (kernel AST with explicit opts, slot -> part name)."""
    from tinygrad.codegen.opt.postrange import Scheduler
    from tinygrad.uop.ops import KernelInfo, Ops

    dummies = {name: Tensor.empty(*v.shape, dtype=v.dtype, device=v.device) for name, v in w.parts.items()}
    xd = Tensor.empty(t, w.shape[1], dtype=dtypes.float32, device=w.device)
    y = qlinear_expr(xd, QTensor(w.ggml_type, w.shape, dummies))
    # qlinear is first called while TinyJit captures a step (the engine captures on the first call), and a
    # capturing JIT swallows the schedule: plan this placeholder kernel outside of it
    from tinygrad.engine import realize

    saved, realize.capturing[:] = list(realize.capturing), []
    try:
        lin = y.schedule_linear()
    finally:
        realize.capturing[:] = saved
    calls = [c for c in lin.src if c.op is Ops.CALL]
    if len(calls) != 1:
        raise RuntimeError(f"expected one kernel, got {len(calls)}")
    call = calls[0]
    ast = call.src[0]
    by_buffer = {id(v.uop.buffer): name for name, v in dummies.items()}
    by_buffer[id(xd.uop.buffer)] = "_x"
    by_buffer[id(y.uop.buffer)] = "_out"
    slots = [by_buffer[id(a.buffer)] for a in call.src[1:]]
    if "_x" not in slots or "_out" not in slots or len(set(slots)) != len(slots):
        raise RuntimeError(f"unexpected kernel arguments {slots}")
    ren = Device[w.device].renderer
    k = Scheduler(_preprocess(ast), ren)
    k.convert_loop_to_global()
    opts = _kernel_opts(k, t, _unroll_count(w), _t_upcast(w))
    # the opts were just applied to the same preprocessed AST apply_opts will see, so they apply at compile time too
    ast = ast.replace(arg=KernelInfo(name=ast.arg.name, opts_to_apply=tuple(opts)))
    if USE_NATIVE and native.supported(w.ggml_type, *w.shape, t):
        try:  # the same kernel (signature, slices) with a hand-written C body: see native.py
            return native.program_for(ast, ren, w.ggml_type, *w.shape, slots, t), slots
        except Exception as e:  # no clang, or tinygrad internals changed: keep tinygrad's kernel
            import warnings

            warnings.warn(f"qlinear: native kernel unavailable ({e!r}); using tinygrad's", stacklevel=2)
    return ast, slots


def _preprocess(ast):
    """The rewrites tinygrad's codegen runs before choosing opts (codegen.full_rewrite_to_sink), so axis numbers
    in our opts mean what apply_opts will see."""
    from tinygrad.codegen import (
        multi_pm,
        pm_flatten_range,
        pm_load_collapse,
        pm_mops,
        pm_simplify_ranges,
        pm_split_ranges,
        sym,
    )
    from tinygrad.uop.ops import graph_rewrite

    sink = graph_rewrite(ast, multi_pm, name="multi_pm")
    sink = graph_rewrite(sink, pm_mops, name="early movement ops", bottom_up=True)
    sink = graph_rewrite(sink, pm_load_collapse, name="load collapse")
    sink = graph_rewrite(sink, pm_split_ranges + pm_flatten_range, ctx={}, name="split ranges")
    sink = graph_rewrite(sink, sym + pm_flatten_range, name="initial symbolic")
    return graph_rewrite(sink, pm_flatten_range + pm_simplify_ranges, ctx={}, name="simplify ranges")


def _kernel_opts(k, t: int, lanes: int, t_upcast: bool = True) -> list:
    """One output row per iteration (no upcast of rows: 5-15x slower here), the in-block lanes (trailing reduce
    axes) unrolled, T upcast by 4 when T > 1 (see _t_upcast), output rows split over threads (core_id)."""
    from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
    from tinygrad.helpers import prod
    from tinygrad.uop.ops import AxisType

    opts = []

    def attempt(opt) -> bool:
        try:
            k.apply_opt(opt)
        except KernelOptError:
            return False
        opts.append(opt)
        return True

    # T > 1 (prefill): each decoded weight serves 4 (or 2) rows of x: 1.2-7x faster per row at T=32 (most types)
    glob = k.axes_of(AxisType.GLOBAL, AxisType.WEAK)
    if t > 1 and t_upcast and glob and k.full_shape[glob[0]] == t:
        for up in (4, 2):
            if t % up == 0 and attempt(Opt(OptOps.UPCAST, glob[0], up)):
                break
    # the lanes are the trailing reduce axes (they may have been merged or kept apart by the scheduler)
    # unroll outermost first so the innermost (contiguous) axis stays innermost in the unrolled code
    ud, m, size = k.unrollable_dims, 0, 1
    while m < len(ud) and size * k.full_shape[ud[len(ud) - 1 - m]] <= lanes:
        size *= k.full_shape[ud[len(ud) - 1 - m]]
        m += 1
    first = len(ud) - m
    for _ in range(m):
        if not attempt(Opt(OptOps.UNROLL, first, 0)):
            break
    if k.ren.has_threads and k.ren.global_max is not None:
        for threads in (32, 16, 12, 8, 6, 5, 4, 3, 2):
            if threads > k.ren.global_max[0] or prod(k.full_shape) // (128 << 10) < threads:
                continue
            # split the output rows (the last global axis), not T: each thread then reads half the weights
            axes = [a for a in k.axes_of(AxisType.GLOBAL, AxisType.WEAK) if k.full_shape[a] % threads == 0]
            if axes and attempt(Opt(OptOps.THREAD, axes[-1], threads)):
                break
    return opts


def _is_llvm(device: str) -> bool:
    """tinygrad's LLVM backend (DEV=CPU:LLVM) and its clang backend want differently shaped kernels."""
    return "LLVM" in type(Device[device].renderer).__name__


def _unroll_count(w: QTensor) -> int:
    """Elements per iteration to unroll (the trailing reduce axes: the 16 lanes and small block axes after them).
    Measured per backend at 576x1536 (see benchmarks/quant.py); 32 separate accumulators were up to 6x slower."""
    qt = w.ggml_type
    if qt == Q.Q8_0:
        return 32
    if qt == Q.Q6_K:
        return 32 if _is_llvm(w.device) else 128
    if qt == Q.Q5_K and not _is_llvm(w.device):
        return 256  # clang: shift amounts constant only when the whole super-block is unrolled (4.5x)
    return 16


def _t_upcast(w: QTensor) -> bool:
    """Upcast T (x rows) by 4 when T > 1? Measured at 576x1536, T=32: 1.2-7x faster per type, except these."""
    qt = w.ggml_type
    return not (qt in (Q.Q8_0, Q.BF16, Q.F32) or (qt == Q.Q4_0 and not _is_llvm(w.device)))


def _f16_to_f32(u: Tensor, llvm: bool) -> Tensor:
    """float16 bit patterns (uint16) -> float32 in the kernel."""
    if (
        llvm
    ):  # exact for normals, subnormals and zeros (inf/nan become large finite values): 1.3x the native cast
        bits = ((u & 0x7FFF).cast(dtypes.uint32) << 13) | ((u & 0x8000).cast(dtypes.uint32) << 16)
        return bits.bitcast(dtypes.float32) * (2.0**112)
    return u.bitcast(dtypes.float16).cast(dtypes.float32)  # clang: 4x faster than loading an __fp16 buffer


def qlinear_expr(x: Tensor, w: QTensor) -> Tensor:
    """The lazy expression behind qlinear (tinygrad picks the kernel options itself)."""
    if x.dtype != dtypes.float32:
        x = x.cast(dtypes.float32)
    qt, (n, k), p = w.ggml_type, w.shape, w.parts
    t = x.shape[0]
    f32 = dtypes.float32
    llvm = _is_llvm(w.device)
    if qt in (Q.F32, Q.F16, Q.BF16):
        lanes = next(v for v in (16, 8, 4, 2, 1) if k % v == 0)
        wt = p["w"]
        if qt == Q.F16:
            wt = _f16_to_f32(wt, llvm)
        elif qt == Q.BF16:
            wt = (wt.cast(dtypes.uint32) << 16).bitcast(f32)
        prod = wt.reshape(1, n, k // lanes, lanes) * x.reshape(t, 1, k // lanes, lanes)
        return _lanes_last(prod, 1, 1)
    if qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1) and llvm:
        # LLVM: the two nibbles as a block axis of 2 (1.3x faster there; 1.5x slower with clang)
        nb = k // 32
        qs = p["qs"].reshape(1, n, nb, 1, 16)
        q = (qs >> _shifts((1, 1, 1, 2, 1), 3, mult=4)) & 15
        if qt in (Q.Q5_0, Q.Q5_1):
            qh = p["qh"].reshape(1, n, nb, 2, 2, 1)  # lane l of half h: bit l%8 of qh byte 2h + l//8
            q = q | (((qh >> _shifts((1, 1, 1, 1, 1, 8), 5)) & 1).reshape(1, n, nb, 2, 16) << 4)
        d = p["d"].reshape(1, n, nb, 1, 1)
        xr = x.reshape(t, 1, nb, 2, 16)
        if qt in (Q.Q4_0, Q.Q5_0):
            prod = d * (q.cast(f32) - (8.0 if qt == Q.Q4_0 else 16.0)) * xr
        else:
            prod = (d * q.cast(f32) + p["m"].reshape(1, n, nb, 1, 1).cast(f32)) * xr
        return _lanes_last(prod, 2, 1)
    if qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        nb = k // 32
        xr = x.reshape(t, 1, nb, 2, 16)
        xl, xh = xr[:, :, :, 0, :], xr[:, :, :, 1, :]
        qs = p["qs"].reshape(1, n, nb, 16)
        lo, hi = qs & 15, qs >> 4
        if qt in (Q.Q5_0, Q.Q5_1):
            # lane l of half h: bit l%8 of qh byte 2h + l//8
            qh = p["qh"].reshape(1, n, nb, 2, 2, 1)
            hb = ((qh >> _shifts((1, 1, 1, 1, 1, 8), 5)) & 1).reshape(1, n, nb, 2, 16)
            lo = lo | (hb[:, :, :, 0, :] << 4)
            hi = hi | (hb[:, :, :, 1, :] << 4)
        d = p["d"].reshape(1, n, nb, 1)
        if qt in (Q.Q4_0, Q.Q5_0):
            off = 8.0 if qt == Q.Q4_0 else 16.0
            prod = d * ((lo.cast(f32) - off) * xl + (hi.cast(f32) - off) * xh)
        else:
            m = p["m"].reshape(1, n, nb, 1).cast(f32)
            prod = d * (lo.cast(f32) * xl + hi.cast(f32) * xh) + m * (xl + xh)
        return _lanes_last(prod, 1, 1)
    if qt == Q.Q8_0:
        nb = k // 32
        # 16 lanes, the two halves of a block as a (unrolled) block axis: 32 accumulators were 6x slower (LLVM)
        qs = p["qs"].reshape(1, n, nb, 2, 16).cast(f32)
        prod = p["d"].reshape(1, n, nb, 1, 1) * qs * x.reshape(t, 1, nb, 2, 16)
        return _lanes_last(prod, 2, 1)
    if qt in (Q.Q4_K, Q.Q5_K):
        nsb = k // 256
        # element 64j + 32h + 16c + i: sub-block s = 2j+h, nibble h of qs[j, 16c+i]; 16 lanes i
        xr = x.reshape(t, 1, nsb, 4, 2, 2, 16)
        dm = p["dm"].reshape(1, n, nsb, 1, 1, 1, 1, 2)
        scm = p["scm"].reshape(1, n, nsb, 2, 4, 2, 1, 1).cast(f32)  # (.., sc|mn, j, h, 1, 1)
        scale = dm[..., 0] * scm[:, :, :, 0]  # (1, n, nsb, 4, 2, 1, 1)
        mins = dm[..., 1] * scm[:, :, :, 1]
        qs = p["qs"].reshape(1, n, nsb, 4, 1, 2, 16)
        q = (qs >> _shifts((1, 1, 1, 1, 2, 1, 1), 4, mult=4)) & 15
        if qt == Q.Q5_K:
            qh = p["qh"].reshape(1, n, nsb, 1, 1, 2, 16)  # the file's layout: bit 2j+h of qh[16c+i]
            sh = Tensor.const(tuple(range(8)), dtypes.uint8).reshape(1, 1, 1, 4, 2, 1, 1)
            q = (q | (((qh >> sh) & 1) << 4)).cast(f32)
            # written so no scale product is broadcast (at T > 1 that made the scheduler split off a kernel)
            prod = q * dm[..., 0] * scm[:, :, :, 0] * xr - xr * dm[..., 1] * scm[:, :, :, 1]
            return _lanes_last(prod, 4, 1)
        prod = (scale * q.cast(f32) - mins) * xr
        return _lanes_last(prod, 4, 1)
    if qt == Q.Q6_K:
        nsb = k // 256
        # element 128*n + 64*kk + 32*km + 16*h + i; ql byte 64n+32km+16h+i nibble kk; qh byte 32n+16h+i bits 2k
        xr = x.reshape(t, 1, nsb, 2, 2, 2, 2, 16)
        ql = p["ql"].reshape(1, n, nsb, 2, 1, 2, 2, 16)
        qh = p["qh"].reshape(1, n, nsb, 2, 1, 1, 2, 16)
        nib = (ql >> _shifts((1, 1, 1, 1, 2, 1, 1, 1), 4, mult=4)) & 15
        hsh = _shifts((1, 1, 1, 1, 2, 1, 1, 1), 4, mult=4) + _shifts((1, 1, 1, 1, 1, 2, 1, 1), 5, mult=2)
        q = nib | (((qh >> hsh) & 3) << 4)
        sc = p["sc"].reshape(1, n, nsb, 2, 2, 2, 2, 1).cast(f32) * p["d"].reshape(1, n, nsb, 1, 1, 1, 1, 1)
        prod = sc * (q.cast(f32) - 32.0) * xr
        # LLVM: lanes (h, i) reduced last (32 accumulators) ran 1.8x faster there than 16; clang: the opposite
        return _lanes_last(prod, 4, 2) if llvm else _lanes_last(prod, 5, 1)
    raise UnsupportedModelError(f"qlinear: GGUF tensor type {qt.name} is not supported")
