"""Replay a captured TinyJit as ONE native call that runs its kernels on every core.

Why: tinygrad 0.14 dispatches each CPU kernel from Python (~45 us per kernel through TinyJit; a
SmolLM2 decode step is ~450 kernels, i.e. ~20 ms of overhead for ~10 ms of work), and it runs a
kernel's `core_id` slices one after another on one thread. Its kernels are fine; the dispatch is not.

How: after TinyJit has captured a step, `KernelPlan` reads the captured program list (function
address, argument addresses, which argument is `core_id`, how many slices) into a table of uint64
words. A tiny C library (compiled once per machine with the same clang/cc tinygrad uses, cached on
disk) walks that table on N threads: slices of a multi-core kernel run in parallel, single-slice
kernels run on the calling thread, and a spin barrier separates dependent kernels. Per call, Python
only patches the few words that change (the session's KV buffers, `start_pos`) and makes one ctypes
call, which releases the GIL, so the agent's event loop keeps running meanwhile.

Without a C compiler the same table is walked from Python, one thread (correct, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# pause()s at a barrier before a thread yields its core (sched_yield), then spins again. Few: on a box whose cores
# are shared, the thread a barrier waits for is often descheduled, and spinning only delays it. Measured, SmolLM2
# decode step at load ~13 on 2 cores: 4000 -> 25.3 ms, 200 -> 8.8, 50 -> 7.6, 5 -> 7.6 (1B: 50.2 -> 42.2 ms).
SPIN_LIMIT = 50
MAX_ARGS = 40  # words of arguments per kernel call (tinygrad's own CPU limit is 63; ours are far below)
_ROW = 4 + MAX_ARGS  # fn, nargs, core slot (or NO_CORE), slices, args...
NO_CORE = np.uint64(0xFFFFFFFFFFFFFFFF)

_C_SOURCE = r"""
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#define MAXA %(maxa)d
#define ROW (4 + MAXA)
#define SPIN_LIMIT %(spins)d
#define A(i) a[i]
typedef void (*kfn)(%(params)s);

static int nth = 1;
static pthread_t th[64];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER, run_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_ulong gen;
static const uint64_t *cmds; static long ncmds;
static atomic_int bar_count, bar_sense, finished;
static int spin_limit = SPIN_LIMIT; /* pause()s before a waiting thread yields its core */
void p2p_runner_spins(int n) { spin_limit = n; }

static inline void relax(void) {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

static void barrier(int *sense) {
  *sense = !*sense;
  if (atomic_fetch_add(&bar_count, 1) == nth - 1) { atomic_store(&bar_count, 0); atomic_store(&bar_sense, *sense); }
  else for (int n = 0; atomic_load_explicit(&bar_sense, memory_order_acquire) != *sense; n++) {
    if (n < spin_limit) relax(); else sched_yield(); /* a busy box: let the other thread run */
  }
}

static void call(const uint64_t *row, uint64_t core) {
  uint64_t a[MAXA];
  memcpy(a, row + 4, sizeof a);
  if (row[2] != UINT64_MAX) a[row[2]] = core;
  ((kfn)row[0])(%(args)s);
}

/* Every thread walks the same table, so all meet the same barriers. Python decided where they go (bit 32 of
   the row's second word): before a kernel that touches memory a kernel since the last barrier wrote (or writes
   memory one read), unless both run on thread 0 alone (single-slice kernels run in order on thread 0). */
static void walk(int t, int *sense) {
  for (long i = 0; i < ncmds; i++) {
    const uint64_t *row = cmds + i * ROW;
    uint64_t slices = row[3];
    if (row[1] >> 32) barrier(sense);
    if (slices <= 1) { if (t == 0) call(row, 0); }
    else for (uint64_t c = t; c < slices; c += nth) call(row, c);
  }
}

static void *worker(void *arg) {
  int t = (int)(intptr_t)arg, sense = 0;
  unsigned long seen = 0;
  for (;;) {
    unsigned long g;
    int spins = 0;
    while ((g = atomic_load(&gen)) == seen && spins < 20000) { relax(); spins++; }
    if (g == seen) {
      pthread_mutex_lock(&mu);
      while ((g = atomic_load(&gen)) == seen) pthread_cond_wait(&cv, &mu);
      pthread_mutex_unlock(&mu);
    }
    seen = g;
    walk(t, &sense);
    atomic_fetch_add(&finished, 1);
  }
  return 0;
}

static int main_sense = 0;

int p2p_runner_start(int n) {
  if (n < 1) n = 1;
  if (n > 64) n = 64;
  nth = n;
  for (int t = 1; t < n; t++)
    if (pthread_create(&th[t], 0, worker, (void *)(intptr_t)t)) return -1;
  return n;
}

void p2p_runner_run(const uint64_t *table, long n) {
  pthread_mutex_lock(&run_mu);
  cmds = table; ncmds = n;
  atomic_store(&finished, 0);
  pthread_mutex_lock(&mu);
  atomic_fetch_add(&gen, 1);
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
  walk(0, &main_sense);
  for (int n = 0; atomic_load(&finished) < nth - 1; n++) { if (n < spin_limit) relax(); else sched_yield(); } /* every slice is done when all workers have left walk() */
  pthread_mutex_unlock(&run_mu);
}
"""


def _c_source() -> str:
    return _C_SOURCE % {
        "maxa": MAX_ARGS,
        "spins": SPIN_LIMIT,
        "params": ", ".join(["uint64_t"] * MAX_ARGS),
        "args": ", ".join(f"a[{i}]" for i in range(MAX_ARGS)),
    }


CACHE_DIR: str | None = None  # set by device.use_kernel_cache (the data dir); else the user's cache dir


def _cache_dir() -> Path:
    if CACHE_DIR is not None:
        return Path(CACHE_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "p2pinfer"


def _build_library() -> Path | None:
    """Compile the runner once per machine (keyed by source and compiler); None when no compiler exists."""
    cc = shutil.which("clang") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = _c_source()
    key = hashlib.sha256((src + cc).encode()).hexdigest()[:16]
    out = _cache_dir() / f"runner-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c_file, so_file = Path(tmp) / "runner.c", Path(tmp) / "runner.so"
        c_file.write_text(src)
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(so_file), str(c_file)],
                             capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            log.warning("cannot build the kernel runner with %s (%s); kernels run on one thread", cc,
                        res.stderr.strip()[-300:])  # fmt: skip
            return None
        os.replace(so_file, out)
    return out


def default_threads() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _NativeRunner:
    """The process-wide thread pool that walks kernel tables (one table at a time)."""

    _instance: _NativeRunner | None = None
    _lock = threading.Lock()

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.lib, self.threads = lib, threads
        lib.p2p_runner_run.argtypes = [ctypes.c_void_p, ctypes.c_long]
        lib.p2p_runner_run.restype = None

    @classmethod
    def get(cls, threads: int) -> _NativeRunner | None:
        with cls._lock:
            if cls._instance is None:
                path = _build_library()
                if path is None:
                    return None
                lib = ctypes.CDLL(str(path))
                started = lib.p2p_runner_start(ctypes.c_int(threads))
                if started < 1:
                    log.warning("kernel runner threads failed to start; kernels run on one thread")
                    return None
                cls._instance = cls(lib, started)
            elif cls._instance.threads != threads:
                log.debug("kernel runner already has %d threads (asked %d)", cls._instance.threads, threads)
            return cls._instance

    def run(self, table: np.ndarray) -> None:
        self.lib.p2p_runner_run(table.ctypes.data, table.shape[0])


def _python_run(table: np.ndarray) -> None:
    """Fallback: the same table walked from Python on this thread (each ctypes call still drops the GIL)."""
    cfunc = ctypes.CFUNCTYPE(None, *[ctypes.c_uint64] * MAX_ARGS)
    for row in table.tolist():
        fn, _, core, slices = row[:4]
        args = row[4:]
        f = cfunc(fn)
        for c in range(max(1, slices)):
            if core != int(NO_CORE):
                args[core] = c
            f(*args)


class StepTemplate:
    """One captured TinyJit as kernel-table rows whose input slots and variables are still open."""

    def __init__(self, jit):
        from tinygrad.engine.realize import get_call_arg_uops, get_runtime
        from tinygrad.helpers import all_int
        from tinygrad.uop.ops import Ops

        captured = jit.captured
        if captured is None:
            raise RuntimeError("StepTemplate needs a captured TinyJit")
        self.ret = captured.ret
        self._jit = jit  # keeps the captured intermediates' memory alive
        rows: list[np.ndarray] = []
        self.names: list[str] = []  # kernel function names, one per row (profiling)
        self.access: list[list[tuple]] = []  # buffers each row touches (where the runner needs barriers)
        self.slot_words: dict[int, list[int]] = {}  # input slot -> word indices (within these rows)
        self.var_words: dict[str, list[int]] = {}
        for call in captured.linear.src:
            ast = call.src[0]
            if ast.op is not Ops.PROGRAM:
                raise NotImplementedError(
                    f"captured step holds a {ast.op} call; only kernels can be replayed"
                )
            info = ast.arg
            if not all_int(info.global_size):
                raise NotImplementedError(f"kernel {info.function_name} has a symbolic launch size")
            device = ast.device if isinstance(ast.device, str) else ast.device[0]
            prog = get_runtime(device, ast)
            arg_uops = get_call_arg_uops(call)
            base = len(rows) * _ROW + 4
            words: list[int] = []
            access: list[tuple] = []  # (slot or None, address, bytes, writes, reads) per buffer argument
            for g in info.globals:
                u = arg_uops[g]
                writes, reads = g in info.outs, g in info.ins or g not in info.outs
                if u.op is Ops.PARAM:
                    self.slot_words.setdefault(u.arg.slot, []).append(base + len(words))
                    access.append((u.arg.slot, 0, 0, writes, reads))
                    words.append(0)
                else:
                    buf = u.buffer.ensure_allocated()
                    words.append(buf._buf.va_addr)
                    access.append((None, buf._buf.va_addr, buf.nbytes, writes, reads))
            self.access.append(access)
            for v in info.vars:
                if v.expr not in prog.runtimevars:
                    self.var_words.setdefault(v.expr, []).append(base + len(words))
                words.append(0)
            if len(words) > MAX_ARGS:
                raise NotImplementedError(f"kernel {info.function_name} takes {len(words)} arguments")
            core = prog.runtimevars.get("core_id")
            row = np.zeros(_ROW, dtype=np.uint64)
            row[0], row[1] = prog.addr, len(words)
            row[2] = NO_CORE if core is None else core
            row[3] = int(info.global_size[0]) if core is not None else 1
            row[4 : 4 + len(words)] = words
            rows.append(row)
            self.names.append(info.function_name)
        self.rows = np.stack(rows)


def buffer_address(tensor) -> int:
    return tensor.uop.buffer.ensure_allocated()._buf.va_addr


class KernelPlan:
    """A whole step as instances of templates, walked by one native call.

    `add(template, fixed)` appends a template's rows with some input slots bound for good (weights,
    activation buffers); `bind(instance, slot, tensor)` (re)points an open slot (e.g. a session's KV cache),
    `set_var(name, value)` binds a symbolic variable in every instance; `run()` executes the step.
    """

    def __init__(self, threads: int):
        self._native = _NativeRunner.get(threads)
        self.threads = self._native.threads if self._native is not None else 1
        self._parts: list[np.ndarray] = []
        self._instances: list[tuple[int, StepTemplate]] = []  # (word offset, template)
        self._fixed: list[dict[int, tuple[int, int]]] = []  # per instance: bound slot -> (address, bytes)
        self._words = 0
        self.table: np.ndarray | None = None

    def add(self, template: StepTemplate, fixed: dict[int, object]) -> int:
        rows = template.rows.copy()
        flat = rows.reshape(-1)
        ranges = {}
        for slot, tensor in fixed.items():
            flat[template.slot_words.get(slot, [])] = buffer_address(tensor)
            ranges[slot] = (buffer_address(tensor), tensor.uop.buffer.nbytes)
        self._parts.append(rows)
        self._fixed.append(ranges)
        self._instances.append((self._words, template))
        self._words += flat.size
        self.table = None
        return len(self._instances) - 1

    def _table(self) -> np.ndarray:
        if self.table is None:
            self.table = np.ascontiguousarray(np.concatenate(self._parts))
            self._flat = self.table.reshape(-1)
            self._place_barriers()
            self._var_index = {}
            for offset, template in self._instances:
                for name, words in template.var_words.items():
                    self._var_index.setdefault(name, []).extend(offset + w for w in words)
            self._var_index = {k: np.asarray(v, dtype=np.int64) for k, v in self._var_index.items()}
        return self.table

    def _place_barriers(self) -> None:
        """Set bit 32 of word 1 of each row that must wait for every earlier kernel (see walk() in the C source).

        A slot left open at add() (a session's KV cache) is its own buffer, distinct from every other; its
        address may change with bind() without changing where barriers go."""
        rows: list[tuple[bool, list]] = []  # (runs on thread 0 only, [(key, lo, hi, writes, reads)])
        for i, (_, template) in enumerate(self._instances):
            for access, row in zip(template.access, template.rows, strict=True):
                spans = []
                for slot, addr, size, writes, reads in access:
                    if slot is not None and slot in self._fixed[i]:
                        addr, size = self._fixed[i][slot]
                        slot = None
                    key = None if slot is None else (i, slot)
                    spans.append((key, addr, addr + size, writes, reads))
                rows.append((int(row[3]) <= 1, spans))

        def conflict(a: list, b: list) -> bool:
            for ka, lo_a, hi_a, wa, ra in a:
                for kb, lo_b, hi_b, wb, rb in b:
                    same = ka == kb if (ka is not None or kb is not None) else lo_a < hi_b and lo_b < hi_a
                    if same and ((wa and (wb or rb)) or (ra and wb)):
                        return True
            return False

        since: list[tuple[bool, list]] = []  # kernels since the last barrier
        flags = np.zeros(len(rows), dtype=np.uint64)
        for j, (single, spans) in enumerate(rows):
            if any(not (single and s1) and conflict(sp1, spans) for s1, sp1 in since):
                flags[j] = 1
                since = []
            since.append((single, spans))
        words = self.table[:, 1] & np.uint64(0xFFFFFFFF)
        self.table[:, 1] = words | (flags << np.uint64(32))
        self.barriers = int(flags.sum())

    @property
    def kernels(self) -> int:
        return self._table().shape[0]

    def bind(self, instance: int, slot: int, tensor) -> None:
        self._table()
        offset, template = self._instances[instance]
        for w in template.slot_words.get(slot, ()):
            self._flat[offset + w] = buffer_address(tensor)

    def set_var(self, name: str, value: int) -> None:
        self._table()
        idx = self._var_index.get(name)
        if idx is not None:
            self._flat[idx] = value

    def profile(self, reps: int = 5) -> list[tuple[str, float]]:
        """(kernel name, best seconds over reps) per row, each row run alone on this thread (slices in turn)."""
        import time

        table = self._table()
        names = [n for _, template in self._instances for n in template.names]
        best = [float("inf")] * table.shape[0]
        for _ in range(reps):
            for i in range(table.shape[0]):
                t0 = time.perf_counter()
                _python_run(table[i : i + 1])
                best[i] = min(best[i], time.perf_counter() - t0)
        return list(zip(names, best, strict=True))

    def run(self) -> None:
        table = self._table()
        if self._native is not None:
            self._native.run(table)
        else:
            _python_run(table)
