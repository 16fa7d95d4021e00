"""A loaded layer range of one model plus its KV sessions: the unit a peer serves in a ring."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from tinygrad import Context, GlobalCounters, Tensor, TinyJit, UOp, dtypes

from .catalog import ModelEntry, open_source
from .errors import ContextLimitError, EngineError, SessionLimitError, UnknownSessionError
from .model import LayerStack
from .model_config import KV_BYTES
from .weights import EmbeddingTable

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096  # KV capacity per session unless the caller asks for more (up to the model's)
PREFILL_CHUNK = 32  # prefill runs in padded chunks of this many positions: one JIT serves every prompt length


def _host_view(t: Tensor) -> np.ndarray:
    """A numpy array sharing a realized CPU tensor's memory (no copy; valid while the tensor lives)."""
    mv = t.uop.buffer.as_memoryview(force_zero_copy=True)
    return np.frombuffer(mv, dtype=np.float32 if t.dtype == dtypes.float32 else np.int32).reshape(t.shape)


@dataclass
class _Session:
    caches: list[Tensor]
    max_tokens: int
    position: int = 0


class Shard:
    """Layers [start, end) of a model. Not thread-safe: the caller serialises calls (any thread will do)."""

    def __init__(self, entry: ModelEntry, start: int, end: int, max_sessions: int, max_context: int,
                 kv_budget_bytes: int | None, prefill_chunk: int):  # fmt: skip
        self.entry, self.start, self.end = entry, start, end
        self.is_first, self.is_last = start == 0, end == entry.n_layers
        self.hidden_size = entry.hidden_size
        self.max_sessions, self.max_context, self.prefill_chunk = max_sessions, max_context, prefill_chunk
        self.kv_bytes_per_session = (
            (end - start) * entry.kv_bytes_per_token_per_layer * (max_context + prefill_chunk)
        )
        self.kv_budget_bytes = (
            kv_budget_bytes if kv_budget_bytes is not None else max_sessions * self.kv_bytes_per_session
        )
        self._sessions: dict[str, _Session] = {}
        # measured at load: tinygrad's allocator counter for device weights + host arrays kept (embedding)
        self.device_weight_bytes = self.host_weight_bytes = self.weight_bytes_allocated = 0
        self.load_seconds = self.warm_seconds = 0.0

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, entry: ModelEntry, start: int, end: int, max_sessions: int = 8, max_context: int | None = None,
             kv_budget_bytes: int | None = None, prefill_chunk: int = PREFILL_CHUNK, warm: bool = True,
             beam: int | None = None) -> Shard:  # fmt: skip
        """Read only this range's tensors (+ embedding on the first shard, + final norm/LM head on the last).

        beam > 0 lets tinygrad search kernel variants while warming up (BEAM=2 measured +30 % decode,
        +50 % prefill here) at the price of minutes of search the first time; results persist in
        tinygrad's disk cache. Default: P2PINFER_BEAM from the environment, else 0.
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
        self = cls(entry, start, end, max_sessions, max_context, kv_budget_bytes, prefill_chunk)
        t0 = time.perf_counter()
        self._load_weights()
        self.load_seconds = time.perf_counter() - t0
        if beam is None:
            beam = int(os.environ.get("P2PINFER_BEAM", "0"))
        if warm:
            t0 = time.perf_counter()
            with Context(BEAM=beam):
                self.warm_up()
            self.warm_seconds = time.perf_counter() - t0
        log.info("loaded %s layers [%d, %d): %.1f MB weights, load %.1fs, warm %.1fs", entry.name, start, end,
                 self.weight_bytes_allocated / 1e6, self.load_seconds, self.warm_seconds)  # fmt: skip
        return self

    def _load_weights(self) -> None:
        source = open_source(self.entry)
        try:
            cfg = self.config = source.config
            before = GlobalCounters.mem_used

            def to_device(a: np.ndarray) -> Tensor:
                return Tensor(np.ascontiguousarray(a, dtype=np.float32)).realize()

            layers = [
                {k: to_device(v) for k, v in source.layer(i).items()} for i in range(self.start, self.end)
            ]
            final_norm = lm_head = None
            if self.is_last:
                final_norm, lm_head = to_device(source.final_norm()), to_device(source.lm_head())
            self.device_weight_bytes = GlobalCounters.mem_used - before
            self._embedding: EmbeddingTable | None = None
            if self.is_first:
                if self.is_last and cfg.tie_embeddings and self.entry.format == "hf":
                    # the LM head already holds this float32 matrix: look rows up in its memory, no second copy
                    self._embedding = EmbeddingTable(_host_view(lm_head))
                else:
                    self._embedding = source.embedding_table()
                    self.host_weight_bytes = self._embedding.nbytes
        finally:
            source.close()
        self.weight_bytes_allocated = self.device_weight_bytes + self.host_weight_bytes
        self._stack = LayerStack(cfg, layers, final_norm, lm_head, self.max_context + self.prefill_chunk)
        # fixed-shape, preallocated inputs: hidden states are copied straight into their memory
        self._x_decode = Tensor.zeros(1, cfg.hidden_size).contiguous().realize()
        self._x_prefill = Tensor.zeros(self.prefill_chunk, cfg.hidden_size).contiguous().realize()
        self._x_decode_host, self._x_prefill_host = _host_view(self._x_decode), _host_view(self._x_prefill)
        self._decode_jit, self._prefill_jit = TinyJit(self._stack), TinyJit(self._stack)
        self._v_start = UOp.variable("start_pos", 0, self.max_context)
        self._v_last = UOp.variable("last_row", 0, self.prefill_chunk - 1)

    def warm_up(self) -> None:
        """Compile and capture both JITs now (TinyJit captures on its second call) so requests never pay for it."""
        sid = "__warmup__"
        self._open(sid, self.max_context, count_budget=False)
        try:
            dummy_ids = np.zeros(self.prefill_chunk, dtype=np.int32)
            dummy = (
                dummy_ids if self.is_first else np.zeros((self.prefill_chunk, self.hidden_size), np.float32)
            )
            # TinyJit runs eagerly on call 1 and captures on call 2; our graphs create no lazy state outside
            # the captured kernels (weights, rope tables and inputs are realized at load), so capture at once
            # and save a whole scheduling pass per JIT
            self._decode_jit.cnt = self._prefill_jit.cnt = 1
            self.forward(sid, dummy)
            self.forward(sid, dummy[:1])
            self.truncate_session(sid, 0)
        finally:
            self.close_session(sid)

    # ---- sessions ------------------------------------------------------------------------------------
    def _kv_bytes_in_use(self) -> int:
        return sum(1 for s in self._sessions if s != "__warmup__") * self.kv_bytes_per_session

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
        if self._kv_bytes_in_use() + self.kv_bytes_per_session > self.kv_budget_bytes:
            raise SessionLimitError(
                f"KV budget {self.kv_budget_bytes / 1e6:.0f} MB full ({len(self._sessions)} sessions of"
                f" {self.kv_bytes_per_session / 1e6:.0f} MB)"
            )
        self._open(sid, max_tokens, count_budget=True)

    def _open(self, sid: str, max_tokens: int, count_budget: bool) -> None:
        cfg = self.config
        capacity = (
            self.max_context + self.prefill_chunk
        )  # slack so a padded last chunk never writes out of bounds
        dtype = dtypes.float32 if KV_BYTES == 4 else dtypes.float16
        caches = [
            Tensor.zeros(2, cfg.n_kv_heads, capacity, cfg.head_dim, dtype=dtype).contiguous().realize()
            for _ in range(self.start, self.end)
        ]
        self._sessions[sid] = _Session(caches, max_tokens)

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
        self._decode_jit = self._prefill_jit = self._stack = self._embedding = None

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
            return self._embedding.lookup(ids)
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
            self._x_decode_host[:] = hidden
            out = self._decode_jit(self._x_decode, self._v_start.bind(s.position), 0, *s.caches).numpy()
            s.position += 1
            return out.reshape(-1) if self.is_last else out.reshape(1, self.hidden_size)
        outputs = []
        for lo in range(0, n, self.prefill_chunk):
            rows = hidden[lo : lo + self.prefill_chunk]
            m = rows.shape[0]
            self._x_prefill_host[:m] = rows
            self._x_prefill_host[m:] = 0.0  # padding rows: computed, written to KV past the end, then ignored
            last = self._v_last.bind(m - 1) if self.is_last else 0
            out = self._prefill_jit(self._x_prefill, self._v_start.bind(s.position), last, *s.caches).numpy()
            s.position += m
            outputs.append(out if self.is_last else out[:m])
        if self.is_last:
            return outputs[-1].reshape(-1)
        return np.ascontiguousarray(np.concatenate(outputs) if len(outputs) > 1 else outputs[0])
