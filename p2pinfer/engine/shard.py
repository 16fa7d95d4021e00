"""A loaded layer range of one model plus its KV sessions: the unit a peer serves in a ring."""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .device import ensure_configured

ensure_configured()  # tinygrad reads DEV once, at import: the engine's choice unless configure() ran first
from tinygrad import Context, GlobalCounters, Tensor, TinyJit, UOp, dtypes

from .catalog import ModelEntry, open_source
from .errors import ContextLimitError, EngineError, SessionLimitError, UnknownSessionError
from .model import LayerStack, flatten_layer, layer_signature
from .model_config import KV_BYTES
from .quant import QTensor
from .runner import KernelPlan, StepTemplate, default_threads

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096  # KV capacity per session unless the caller asks for more (up to the model's)
WARM_CAPACITY = 2048  # the KV class warmed at load: what a request without max_tokens gets (others capture on use)
PREFILL_CHUNK = 32  # prefill runs in padded chunks of this many positions: one JIT serves every prompt length
MAX_ROWS = 8  # sessions one decode step can carry (forward_rows)
# a step of n sessions runs the plan of the next of these counts (kernels captured on first use, ~1.5-2.5 s
# each here), its spare rows repeating the first session: same inputs, so the same bytes written to the same
# KV position, and outputs that are dropped
ROW_PLANS = (2, 4, 8)

# progress(stage, done, total) while a shard loads: stage "load" counts bytes of weights read (of
# ModelEntry.shard_bytes), stage "warm" counts captured step templates (each one's kernels generated and
# compiled, or found in the kernel cache). Called from the loading thread; it must be quick and not raise.
Progress = Callable[[str, int, int], None]


def _host_view(t: Tensor) -> np.ndarray:
    """A numpy array sharing a realized CPU tensor's memory (no copy; valid while the tensor lives)."""
    mv = t.uop.buffer.as_memoryview(force_zero_copy=True)
    return np.frombuffer(mv, dtype=np.float32 if t.dtype == dtypes.float32 else np.int32).reshape(t.shape)


def capacity_classes(max_context: int) -> tuple[int, ...]:
    """KV sizes a session can get: 512, 2048, 8192, ... below max_context, then max_context itself.

    A session's KV is sized for what its request can reach (prompt + max_tokens), rounded up to a class,
    not for the whole context: a short chat holds 25 MB of SmolLM2 KV, not 190. Each class has its own
    captured kernels (the KV length is part of the kernel), captured on first use.
    """
    out, c = [], 512
    while c < max_context:
        out.append(c)
        c *= 4
    return (*out, max_context)


@dataclass
class _Session:
    caches: list[Tensor]
    max_tokens: int
    capacity: int  # KV positions held (a capacity class)
    position: int = 0


class Shard:
    """Layers [start, end) of a model. Not thread-safe: the caller serialises calls (any thread will do)."""

    def __init__(self, entry: ModelEntry, start: int, end: int, max_sessions: int, max_context: int,
                 kv_budget_bytes: int | None, prefill_chunk: int, threads: int):  # fmt: skip
        self.entry, self.start, self.end, self.threads = entry, start, end, threads
        self.is_first, self.is_last = start == 0, end == entry.n_layers
        self.hidden_size = entry.hidden_size
        self.max_sessions, self.max_context, self.prefill_chunk = max_sessions, max_context, prefill_chunk
        self.kv_bytes_per_session = self.kv_bytes_for(max_context)  # the largest a session can need
        self.kv_budget_bytes = (
            kv_budget_bytes if kv_budget_bytes is not None else max_sessions * self.kv_bytes_per_session
        )
        self._sessions: dict[str, _Session] = {}
        # measured at load: tinygrad's allocator counter for the weights (packed matrices, vectors, tables)
        self.weight_bytes_allocated = 0
        self.load_seconds = self.warm_seconds = 0.0
        self._on_capture: Callable[[], None] | None = None  # set while warm_up reports progress

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, entry: ModelEntry, start: int, end: int, max_sessions: int = 8, max_context: int | None = None,
             kv_budget_bytes: int | None = None, prefill_chunk: int = PREFILL_CHUNK, warm: bool = True,
             beam: int | None = None, threads: int | None = None, progress: Progress | None = None,
             warm_tokens: int = WARM_CAPACITY) -> Shard:  # fmt: skip
        """Read only this range's tensors (+ embedding on the first shard, + final norm/LM head on the last).

        beam > 0 lets tinygrad search kernel variants while warming up (BEAM=2 measured +30 % decode,
        +50 % prefill here) at the price of minutes of search the first time; results persist in
        tinygrad's disk cache. Default: P2PINFER_BEAM from the environment, else 0.
        threads: cores the kernels run on (default: every core this process may use).
        progress: called as progress(stage, done, total) while loading and warming (see `Progress`).
        warm_tokens: the KV size whose steps are captured at load (other sizes are captured on first use).
        """
        if not 0 <= start < end <= entry.n_layers:
            raise EngineError(
                f"layer range [{start}, {end}) invalid for {entry.name} ({entry.n_layers} layers)"
            )
        if max_context is None:
            max_context = min(entry.context_length, DEFAULT_MAX_CONTEXT)
        if max_context > entry.context_length:
            raise ContextLimitError(
                f"max_context {max_context} exceeds {entry.name}'s context length {entry.context_length}"
            )
        self = cls(entry, start, end, max_sessions, max_context, kv_budget_bytes, prefill_chunk,
                   threads or default_threads())  # fmt: skip
        self.beam = int(os.environ.get("P2PINFER_BEAM", "0")) if beam is None else beam
        t0 = time.perf_counter()
        self._load_weights(progress)
        self.load_seconds = time.perf_counter() - t0
        if warm:
            t0 = time.perf_counter()
            self.warm_up(progress, warm_tokens)
            self.warm_seconds = time.perf_counter() - t0
        log.info("loaded %s layers [%d, %d): %.1f MB weights, load %.1fs, warm %.1fs", entry.name, start, end,
                 self.weight_bytes_allocated / 1e6, self.load_seconds, self.warm_seconds)  # fmt: skip
        return self

    def _load_weights(self, progress: Progress | None = None) -> None:
        """Matrices stay packed (QTensor, straight from the file's mmap); only vectors become float32 tensors."""
        source = open_source(self.entry)
        e = self.entry
        total, done = e.shard_bytes(self.start, self.end), 0

        def read(nbytes: int) -> None:
            nonlocal done
            done = min(total, done + nbytes)
            if progress is not None:
                progress("load", done, total)

        try:
            cfg = self.config = source.config
            before = GlobalCounters.mem_used

            def to_device(v):
                return v if isinstance(v, QTensor) else Tensor(np.ascontiguousarray(v, dtype=np.float32)).realize()

            read(0)
            self._layers = []
            for i in range(self.start, self.end):
                self._layers.append({k: to_device(v) for k, v in source.layer(i).items()})
                read(e.layer_bytes)
            final_norm = lm_head = None
            if self.is_last:
                final_norm, lm_head = to_device(source.final_norm()), source.lm_head()
                read(e.head_bytes)
            # the first shard gathers embedding rows on the host; tied models share the head's packed bytes
            self._embedding: QTensor | None = source.embedding() if self.is_first else None
            read(total - done)
            self.weight_bytes_allocated = GlobalCounters.mem_used - before
        finally:
            source.close()
        self._stack = LayerStack(cfg, final_norm, lm_head, self.max_context + self.prefill_chunk)
        # per chunk size, two activation buffers that layers write alternately (layer i reads one, writes the other)
        self._act = {
            t: tuple(Tensor.zeros(t, cfg.hidden_size).contiguous().realize() for _ in range(2))
            for t in (1, self.prefill_chunk)
        }
        self._plans: dict[int, _StepPlan] = {}
        self.rows_exact = self._every_matrix_has_rows_kernel()
        self._v_start = UOp.variable("start_pos", 0, self.max_context)
        self._v_last = UOp.variable("last_row", 0, self.prefill_chunk - 1)
        self._v_starts = [UOp.variable(f"start_pos_{b}", 0, self.max_context) for b in range(MAX_ROWS)]

    def _every_matrix_has_rows_kernel(self) -> bool:
        """A step of several sessions gives each exactly what it gets alone only where every matrix has a
        native kernel for a few rows (Q4_0, Q4_1, Q8_0): tinygrad's own kernels (K-quants, float matrices)
        may sum a row of several in another order than a row alone."""
        from . import native, quant

        mats = [v for w in self._layers for v in w.values()]
        if self.is_last:
            mats.append(self._stack.lm_head)
        return quant.USE_NATIVE and all(
            native.rows_exact(v.ggml_type) if isinstance(v, QTensor) else len(v.shape) < 2 for v in mats
        )

    def kv_bytes_for(self, capacity: int) -> int:
        return (self.end - self.start) * self.entry.kv_bytes_per_token_per_layer * (capacity + self.prefill_chunk)

    def _capacity_for(self, max_tokens: int) -> int:
        return next(c for c in capacity_classes(self.max_context) if c >= max_tokens)

    def warm_up(self, progress: Progress | None = None, tokens: int = WARM_CAPACITY) -> None:
        """Capture and compile the decode and prefill steps now, so requests never pay for it."""
        capacity = self._capacity_for(min(tokens, self.max_context))
        steps = (1, self.prefill_chunk)
        if progress is None:
            for t in steps:
                self._plan(t, capacity)
            return
        # one template per distinct layer signature (+ the head on the last shard), per step
        per_step = len({layer_signature(w) for w in self._layers}) + int(self.is_last)
        total, done = per_step * len(steps), 0

        def captured() -> None:
            nonlocal done
            done = min(total, done + 1)
            progress("warm", done, total)

        progress("warm", 0, total)
        self._on_capture = captured
        try:
            for t in steps:
                self._plan(t, capacity)
        finally:
            self._on_capture = None
        progress("warm", total, total)  # steps captured earlier count as warm

    def _plan(self, t: int, capacity: int) -> _StepPlan:
        """The step for chunks of `t` positions over KV of `capacity`: one captured layer per weight
        signature, replayed for every layer."""
        plan = self._plans.get((t, capacity))
        if plan is not None:
            return plan
        sid = "__warmup__"
        self._open(sid, capacity)
        try:
            # kernels are generated for this shard's thread count (tinygrad splits rows into `core_id` slices)
            with Context(BEAM=self.beam, NUM_CPU_THREADS=self.threads):
                plan = self._plans[t, capacity] = self._capture(t, self._sessions[sid])
        finally:
            self.close_session(sid)
        return plan

    def _capture(self, t: int, scratch: _Session) -> _StepPlan:
        kernels = KernelPlan(self.threads)
        templates: dict = {}
        bufs = self._act[t]
        start = self._v_start.bind(0)
        for i, w in enumerate(self._layers):
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            sig, flat = layer_signature(w), flatten_layer(w)
            if sig not in templates:
                # JIT slots: 0 src, 1 dst, 2 KV cache, 3.. the layer's weights
                templates[sig] = self._template(functools.partial(self._stack.layer_step, sig), src, dst,
                                                scratch.caches[i], start, flat)  # fmt: skip
            kernels.add(templates[sig], {0: src, 1: dst, **{3 + k: v for k, v in enumerate(flat)}})
        out = bufs[len(self._layers) % 2]
        if self.is_last:
            w = self._stack.head_weights()
            sig, flat = layer_signature(w), flatten_layer(w)
            head = self._template(functools.partial(self._stack.head_step, sig), out,
                                  self._v_last.bind(0) if t > 1 else 0, flat)  # fmt: skip
            kernels.add(head, {0: out, **{1 + k: v for k, v in enumerate(flat)}})
            out = head.ret
        return _StepPlan(kernels, bufs[0], out)

    def _rows_plan(self, rows: int, capacity: int) -> _StepPlan:
        """The decode step for `rows` sessions at once over KV of `capacity` (each its own KV and position)."""
        plan = self._plans.get(("rows", rows, capacity))
        if plan is not None:
            return plan
        if rows not in self._act:
            self._act[rows] = tuple(Tensor.zeros(rows, self.hidden_size).contiguous().realize() for _ in range(2))
        scratch = [f"__warmup_{b}__" for b in range(rows)]  # distinct buffers: a JIT input may not repeat
        for sid in scratch:
            self._open(sid, capacity)
        try:
            with Context(BEAM=self.beam, NUM_CPU_THREADS=self.threads):
                plan = self._capture_rows(rows, [self._sessions[sid] for sid in scratch])
            self._plans["rows", rows, capacity] = plan
        finally:
            for sid in scratch:
                self.close_session(sid)
        return plan

    def _capture_rows(self, rows: int, scratch: list[_Session]) -> _StepPlan:
        kernels = KernelPlan(self.threads)
        templates: dict = {}
        bufs = self._act[rows]
        starts = [v.bind(0) for v in self._v_starts[:rows]]
        for i, w in enumerate(self._layers):
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            sig, flat = layer_signature(w), flatten_layer(w)
            if sig not in templates:
                # JIT slots: 0 src, 1 dst, 2.. the sessions' KV caches, then the layer's weights
                templates[sig] = self._template(functools.partial(self._stack.layer_step_rows, sig), src, dst,
                                                *[s.caches[i] for s in scratch], *starts, flat)  # fmt: skip
            kernels.add(templates[sig], {0: src, 1: dst, **{2 + rows + k: v for k, v in enumerate(flat)}})
        out = bufs[len(self._layers) % 2]
        if self.is_last:
            w = self._stack.head_weights()
            sig, flat = layer_signature(w), flatten_layer(w)
            head = self._template(functools.partial(self._stack.head_step_rows, sig), out, flat)
            kernels.add(head, {0: out, **{1 + k: v for k, v in enumerate(flat)}})
            out = head.ret
        return _StepPlan(kernels, bufs[0], out, rows)

    def _template(self, fn, *args) -> StepTemplate:
        """Capture a step function (schedule, generate and compile its kernels; compiled kernels come from
        tinygrad's disk cache when it has them) and read it into a kernel table template.

        Not pickled across processes: an unpickled capture's buffer UOps are hash-consed with live ones of
        the loading process that carry the same unique number, so its kernels read the wrong memory (seen:
        correct alone, garbage once several shards were loaded in one process)."""
        jit = TinyJit(fn)
        jit.cnt = 1  # capture on the first call: everything it reads is realized already
        jit(*args)
        template = StepTemplate(jit)
        if self._on_capture is not None:
            self._on_capture()
        return template

    # ---- sessions ------------------------------------------------------------------------------------
    def _kv_bytes_in_use(self) -> int:
        return sum(self.kv_bytes_for(s.capacity) for sid, s in self._sessions.items() if not sid.startswith("__warmup"))

    def open_session(self, sid: str, max_tokens: int) -> None:
        if sid in self._sessions:
            raise EngineError(f"session {sid!r} already open")
        if max_tokens > self.max_context:
            raise ContextLimitError(
                f"session {sid!r} wants {max_tokens} tokens but this shard's context is {self.max_context}"
                f" (model {self.entry.name}: {self.entry.context_length})"
            )
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitError(
                f"shard {self.entry.name}[{self.start}:{self.end}] is full: {self.max_sessions} sessions open"
            )
        need = self.kv_bytes_for(self._capacity_for(max_tokens))
        if self._kv_bytes_in_use() + need > self.kv_budget_bytes:
            raise SessionLimitError(
                f"KV budget {self.kv_budget_bytes / 1e6:.0f} MB full ({len(self._sessions)} sessions hold"
                f" {self._kv_bytes_in_use() / 1e6:.0f} MB; this one needs {need / 1e6:.0f} MB)"
            )
        self._open(sid, max_tokens)

    def _open(self, sid: str, max_tokens: int) -> None:
        cfg = self.config
        capacity = self._capacity_for(max_tokens)
        dtype = dtypes.float32 if KV_BYTES == 4 else dtypes.float16
        # prefill_chunk of slack so a padded last chunk never writes out of bounds; no zero fill: a position
        # is always written before it is attended to
        caches = [Tensor.empty(2, cfg.n_kv_heads, capacity + self.prefill_chunk, cfg.head_dim, dtype=dtype)
                  for _ in range(self.start, self.end)]  # fmt: skip
        for c in caches:
            c.uop.buffer.ensure_allocated()
        self._sessions[sid] = _Session(caches, max_tokens, capacity)

    def _session(self, sid: str) -> _Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise UnknownSessionError(f"no session {sid!r} on this shard") from None

    def session_position(self, sid: str) -> int:
        return self._session(sid).position

    def truncate_session(self, sid: str, n_tokens: int) -> None:
        """Forget positions >= n_tokens (stale KV beyond is overwritten before it is ever attended to)."""
        s = self._session(sid)
        if not 0 <= n_tokens <= s.position:
            raise EngineError(f"cannot truncate session {sid!r} at {n_tokens}: it holds {s.position} tokens")
        s.position = n_tokens

    def close_session(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def close(self) -> None:
        self._sessions.clear()
        self._plans.clear()
        self._layers = self._stack = self._embedding = None

    # ---- compute -------------------------------------------------------------------------------------
    def _as_hidden(self, x: np.ndarray) -> np.ndarray:
        if self.is_first:
            ids = np.asarray(x)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise EngineError(
                    f"first shard expects a 1-D array of token ids, got {ids.dtype} {ids.shape}"
                )
            if ids.size and (ids.min() < 0 or ids.max() >= self.entry.vocab_size):
                raise EngineError(f"token id out of range [0, {self.entry.vocab_size})")
            return self._embedding.dequantize_rows(ids)
        h = np.asarray(x)
        if h.ndim != 2 or h.shape[1] != self.hidden_size or h.dtype != np.float32:
            raise EngineError(
                f"expected float32 hidden states (T, {self.hidden_size}), got {h.dtype} {h.shape}"
            )
        return h

    def forward(self, sid: str, x: np.ndarray) -> np.ndarray:
        """Run this shard on one chunk of positions of session `sid`; see the package docs for shapes."""
        s = self._session(sid)
        hidden = self._as_hidden(x)
        n = hidden.shape[0]
        if n == 0:
            raise EngineError("forward needs at least one position")
        if s.position + n > s.max_tokens:
            raise ContextLimitError(
                f"session {sid!r}: {s.position} + {n} tokens exceed its limit of {s.max_tokens} (shard context {self.max_context})"
            )
        if n == 1:
            out = self._plan(1, s.capacity).run(s, hidden)
            s.position += 1
            return out.reshape(-1).copy() if self.is_last else out.reshape(1, self.hidden_size).copy()
        outputs = []
        chunk = self._plan(self.prefill_chunk, s.capacity)
        for lo in range(0, n, self.prefill_chunk):
            rows = hidden[lo : lo + self.prefill_chunk]
            m = rows.shape[0]
            # padding rows past m are computed and written to KV past the end, then ignored
            out = chunk.run(s, rows, last_row=m - 1)
            s.position += m
            outputs.append(out.copy() if self.is_last else out[:m].copy())
        if self.is_last:
            return outputs[-1].reshape(-1)
        return np.ascontiguousarray(np.concatenate(outputs) if len(outputs) > 1 else outputs[0])


    def forward_rows(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray | EngineError]:
        """One decode step for several sessions: items are (session, its next position: one token id on the
        first shard, a (1, hidden) row after). Each weight is read once for all of them, and each session's
        output equals, bit for bit, what forward would return for it alone (where a matrix has no exact kernel
        for several rows, `rows_exact` is False and the sessions run one by one). Returns per item its output
        (as forward's) or the EngineError that item alone raised (unknown session, context full, bad input)."""
        results: list = [None] * len(items)
        groups: dict[int, list[tuple[int, _Session, np.ndarray]]] = {}
        seen: set[str] = set()
        for n, (sid, x) in enumerate(items):
            try:
                if sid in seen:
                    raise EngineError(f"session {sid!r} appears twice in one step")
                seen.add(sid)
                s = self._session(sid)
                hidden = self._as_hidden(x)
                if hidden.shape[0] != 1:
                    raise EngineError(f"forward_rows takes one position per session, got {hidden.shape[0]}")
                if s.position + 1 > s.max_tokens:
                    raise ContextLimitError(f"session {sid!r}: {s.position} + 1 tokens exceed its limit of {s.max_tokens}")
            except EngineError as e:
                results[n] = e
                continue
            groups.setdefault(s.capacity, []).append((n, s, hidden))
        for capacity, group in groups.items():  # a plan's KV length is fixed: one step per capacity class
            for lo in range(0, len(group), MAX_ROWS):
                part = group[lo : lo + MAX_ROWS]
                if len(part) == 1 or not self.rows_exact:  # one by one, as forward does
                    plan = self._plan(1, capacity)
                    for n, s, h in part:
                        out = plan.run(s, h)
                        s.position += 1
                        results[n] = out.reshape(-1).copy() if self.is_last else out.reshape(1, -1).copy()
                    continue
                plan = self._rows_plan(next(r for r in ROW_PLANS if r >= len(part)), capacity)
                spare = [part[0]] * (plan.rows - len(part))
                out = plan.run_rows([s for _, s, _ in part + spare], np.concatenate([h for _, _, h in part + spare]))
                for b, (n, s, _) in enumerate(part):
                    s.position += 1
                    results[n] = out[b].copy() if self.is_last else out[b : b + 1].copy()
        return results


class _StepPlan:
    """A step's KernelPlan plus its host-visible input and output: per call only the session and positions change."""

    def __init__(self, kernels: KernelPlan, x: Tensor, out: Tensor, rows: int = 0):
        self.kernels = kernels
        self.x, self.out = _host_view(x), _host_view(out)
        self.rows = rows  # > 0: a step of `rows` sessions (run_rows)
        self._bound = lambda: None  # weak: a closed session's KV must not stay alive through the plan
        self._bound_rows: tuple = ()

    def run(self, s: _Session, rows: np.ndarray, last_row: int = 0) -> np.ndarray:
        if self._bound() is not s:  # instance i is layer i; its slot 2 is that layer's KV cache
            for i, cache in enumerate(s.caches):
                self.kernels.bind(i, 2, cache)
            self._bound = weakref.ref(s)
        m = rows.shape[0]
        self.x[:m] = rows
        self.x[m:] = 0.0
        self.kernels.set_var("start_pos", s.position)
        self.kernels.set_var("last_row", last_row)
        self.kernels.run()
        return self.out

    def run_rows(self, sessions: list[_Session], rows: np.ndarray) -> np.ndarray:
        """One position for each session (row b for sessions[b]); a plan of 1 row is the plain decode step."""
        if not self.rows:
            return self.run(sessions[0], rows).reshape(1, -1)
        same = len(self._bound_rows) == len(sessions) and all(
            r() is s for r, s in zip(self._bound_rows, sessions, strict=True)
        )
        if not same:  # slot 2 + b of layer i: session b's KV
            for i in range(len(sessions[0].caches)):
                for b, s in enumerate(sessions):
                    self.kernels.bind(i, 2 + b, s.caches[i])
            self._bound_rows = tuple(weakref.ref(s) for s in sessions)
        self.x[:] = rows
        for b, s in enumerate(sessions):
            self.kernels.set_var(f"start_pos_{b}", s.position)
        self.kernels.run()
        return self.out
