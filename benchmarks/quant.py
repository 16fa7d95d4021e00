"""How fast are the quantised matvec kernels (p2pinfer.engine.quant.qlinear)? Per type and shape: microseconds per
T=1 call of the compiled kernel itself (called directly, no JIT dispatch), GB/s of resident weight bytes, and the
ratio against a numpy float32 matvec of the same shape and the machine's memory read bandwidth, all in one run.

    python benchmarks/quant.py [--types Q4_0,Q8_0] [--shapes 1536x576,4096x4096] [--t 1] [--reps 40]
    python benchmarks/quant.py --native [--threads 2] [--types ...] [--shapes ...]

--native: T=1 decode kernels as the engine runs them (captured, replayed by the native runner on --threads threads
and on one), tinygrad's generated kernel against native.py's C body, interleaved in one process; weights read from
DRAM (enough copies of the matrix to exceed the last-level cache, walked in turn), with a numpy sum of as many bytes
as the DRAM reference. Best of --reps rounds (a shared box: compare within a run).

Single-threaded numbers: tinygrad's CPU runtime runs a kernel's core_id slices one after another, and numpy's BLAS
is pinned to one thread here. DEV=CPU (clang) or DEV=CPU:LLVM choose the backend (default: the engine's choice).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from p2pinfer.engine.device import configure_tinygrad_device  # noqa: E402

configure_tinygrad_device()  # DEV must be chosen before tinygrad is imported

import numpy as np  # noqa: E402
from gguf import GGML_QUANT_SIZES, quants  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tinygrad import Device, Tensor  # noqa: E402
from tinygrad.runtime.ops_cpu import CPUProgram  # noqa: E402

from p2pinfer.engine.quant import QTensor, qlinear  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "F16")
SHAPES = ((1536, 576), (576, 1536), (49152, 576), (4096, 4096))


class KernelRecorder:
    """Records the CPU programs a realize runs, so they can be re-run and timed directly."""

    def __init__(self):
        self.calls: list = []

    def __enter__(self):
        self._orig = orig = CPUProgram.__call__
        calls = self.calls

        def call(prg, *bufs, **kw):
            calls.append((prg, bufs, kw))
            return orig(prg, *bufs, **kw)

        CPUProgram.__call__ = call
        return self

    def __exit__(self, *exc):
        CPUProgram.__call__ = self._orig

    def time_us(self, reps: int) -> float:
        """Median over reps of the summed kernel time of one call (CPUProgram(wait=True) returns seconds)."""
        total = []
        for _ in range(reps):
            s = 0.0
            for prg, bufs, kw in self.calls:
                s += self._orig(prg, *bufs, **{**kw, "wait": True})
            total.append(s)
        return float(np.median(total)) * 1e6

    def threads(self) -> int:
        return max(kw.get("global_size", (1, 1, 1))[0] for _, _, kw in self.calls)


def make_raw(qt, n: int, k: int, rng) -> np.ndarray:
    """Raw GGUF data for a random (n, k) matrix (K-quants: random quant bytes with sane fp16 scales)."""
    if qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, bbytes = GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (n, k // block, bbytes), dtype=np.uint8)
        for off in (208,) if qt == Q.Q6_K else (0, 2):
            raw[..., off : off + 2] = (
                rng.uniform(0.001, 0.01, (n, k // block, 1)).astype(np.float16).view(np.uint8)
            )
        return raw.reshape(n, -1)
    w = rng.standard_normal((n, k), dtype=np.float32)
    return w if qt == Q.F32 else quants.quantize(w, qt)


def bench_numpy(n: int, k: int, t: int, reps: int, rng) -> float:
    """numpy float32 W @ x (T=1) or x @ W.T (T>1), one BLAS thread."""
    w = rng.standard_normal((n, k), dtype=np.float32)
    x = rng.standard_normal(k, dtype=np.float32) if t == 1 else rng.standard_normal((t, k), dtype=np.float32)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _ = w @ x if t == 1 else x @ w.T
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def memory_bandwidth() -> float:
    """GB/s of a numpy sum over 1 GiB (one thread)."""
    a = np.ones(1 << 28, dtype=np.float32)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bench_native(types, shapes, threads: int, reps: int) -> None:
    """tinygrad's kernel vs the native C body, T=1, from DRAM, through the engine's runner."""
    from tinygrad import Context, TinyJit

    from p2pinfer.engine import quant
    from p2pinfer.engine.runner import KernelPlan, StepTemplate, _python_run

    rng = np.random.default_rng(0)
    print(
        f"{'type':6} {'shape':>11} {'MB':>6}  {'tinygrad GB/s':>19}  {'native GB/s':>19}  (1 thread / {threads} threads)"
    )
    for qt in types:
        for n, k in shapes:
            if qt not in quant.native.NATIVE_TYPES or k % 32:
                continue
            raw = make_raw(qt, n, k, rng)
            copies = max(2, int(160e6 // raw.nbytes))
            ws = [QTensor.from_raw(raw, qt, (n, k)) for _ in range(copies)]
            names = sorted(ws[0].parts)
            x = Tensor(rng.standard_normal((1, k), dtype=np.float32)).realize()
            plans = []
            for use_native in (False, True):
                quant.USE_NATIVE = use_native
                quant._KERNELS.clear()

                def step(x, *ps, qt=qt, n=n, k=k, names=names):
                    return qlinear(x, QTensor(qt, (n, k), dict(zip(names, ps, strict=True)))).contiguous()

                with Context(NUM_CPU_THREADS=threads):
                    jit = TinyJit(step)
                    jit.cnt = 1
                    jit(x, *[ws[0].parts[a] for a in names])
                    template = StepTemplate(jit)
                plan = KernelPlan(threads)
                for w in ws:
                    plan.add(template, {0: x, **{1 + i: w.parts[a] for i, a in enumerate(names)}})
                plans.append(plan)
            quant.USE_NATIVE = True
            total = sum(w.nbytes for w in ws)
            best = [[0.0, 0.0], [0.0, 0.0]]
            for _ in range(reps):
                for i, plan in enumerate(plans):
                    t0 = time.perf_counter()
                    _python_run(plan._table())
                    t1 = time.perf_counter()
                    plan.run()
                    t2 = time.perf_counter()
                    best[i][0] = max(best[i][0], total / (t1 - t0) / 1e9)
                    best[i][1] = max(best[i][1], total / (t2 - t1) / 1e9)
            (t1, t2), (n1, n2) = best
            print(
                f"{qt.name:6} {n:>5}x{k:<5} {ws[0].nbytes / 1e6:6.2f}  {t1:8.1f} / {t2:8.1f}  {n1:8.1f} / {n2:8.1f}"
                f"  native/tinygrad {n2 / t2:4.1f}x",
                flush=True,
            )
            del ws, plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--t", type=int, default=1, help="rows of x (1 = decode)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument(
        "--native", action="store_true", help="tinygrad vs native C kernels, from DRAM, via the runner"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    types = [Q[name] for name in args.types.split(",")]
    rng = np.random.default_rng(0)

    print(f"device {Device.DEFAULT} ({os.environ.get('DEV')}), T={args.t}, python {sys.version.split()[0]}")
    bw = memory_bandwidth()
    print(f"memory read bandwidth (numpy sum over 1 GiB, 1 thread): {bw:.1f} GB/s")
    if args.native:
        if "--shapes" not in sys.argv:
            shapes = [(5632, 2048), (2048, 5632), (2048, 2048), (49152, 2048), (1536, 576), (576, 1536)]
        if "--types" not in sys.argv:
            types = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
        bench_native(types, shapes, args.threads, min(args.reps, 8))
        return
    np_us = {}
    for n, k in shapes:
        np_us[(n, k)] = bench_numpy(n, k, args.t, args.reps, rng)
        print(
            f"numpy f32 {n}x{k} T={args.t}: {np_us[(n, k)]:.0f} us ({n * k * 4 / np_us[(n, k)] / 1e3:.1f} GB/s)"
        )
    print()
    print(
        f"{'type':6} {'shape':>11} {'us':>9} {'GB/s':>6} {'xBW':>5} {'vs np':>6} {'res/raw':>7} {'thr':>3}  kernel"
    )
    for qt in types:
        for n, k in shapes:
            block = GGML_QUANT_SIZES[qt][0]
            if k % block:
                print(f"{qt.name:6} {n:>5}x{k:<5} skipped: rows not a multiple of {block}")
                continue
            w = QTensor.from_raw(make_raw(qt, n, k, rng), qt, (n, k))
            x = Tensor(rng.standard_normal((args.t, k), dtype=np.float32)).realize()
            qlinear(x, w).realize()  # compile
            with KernelRecorder() as rec:
                qlinear(x, w).realize()
            us = rec.time_us(args.reps)
            gbs = w.nbytes / us / 1e3
            names = ",".join(prg.name for prg, _, _ in rec.calls)
            print(
                f"{qt.name:6} {n:>5}x{k:<5} {us:9.1f} {gbs:6.2f} {gbs / bw:5.2f} {np_us[(n, k)] / us:6.2f}"
                f" {w.nbytes / w.raw_nbytes:7.3f} {rec.threads():>3}  {names}"
            )
            del w


if __name__ == "__main__":
    main()
