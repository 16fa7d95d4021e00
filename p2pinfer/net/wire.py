"""Frames on a stream: length-prefixed msgpack header plus raw little-endian tensor bytes.

    u32 header_len | u32 body_len | header (msgpack map) | body

Both lengths are checked against hard limits before anything is allocated, and a tensor's
declared dtype and shape must account for exactly body_len bytes. A peer killed mid-frame
shows up as a short read, which is an error here, never a truncated frame.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgpack
import numpy as np

MAX_HEADER = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
_PREFIX = struct.Struct(">II")
_DTYPES = {"<f4": np.dtype("<f4"), "<i4": np.dtype("<i4"), "<f2": np.dtype("<f2")}


class FrameError(Exception):
    """A malformed or oversized frame: the stream carrying it cannot be trusted any further."""


class StreamClosed(Exception):
    """The stream ended cleanly between frames."""


@dataclass
class Frame:
    header: dict
    tensor: np.ndarray | None = None
    at: float = 0.0  # time.perf_counter() when a stream's reader had it whole (0: an in-process frame)


def encode_frame(header: dict, tensor: np.ndarray | None = None) -> bytes:
    h = dict(header)
    body = b""
    if tensor is not None:
        t = np.ascontiguousarray(tensor)
        dt = t.dtype.newbyteorder("<") if t.dtype.byteorder == ">" else t.dtype
        key = dt.str if dt.str in _DTYPES else None
        if key is None:
            raise FrameError(f"unsupported tensor dtype {t.dtype}")
        t = t.astype(_DTYPES[key], copy=False)
        h["dt"], h["sh"] = key, list(t.shape)
        body = t.tobytes()
    head = msgpack.packb(h, use_bin_type=True)
    if len(head) > MAX_HEADER or len(body) > MAX_BODY:
        raise FrameError(f"frame too large (header {len(head)} B, body {len(body)} B)")
    return _PREFIX.pack(len(head), len(body)) + head + body


def decode_body(header: dict, body: bytes) -> np.ndarray | None:
    if "dt" not in header:
        if body:
            raise FrameError("frame carries bytes but no tensor description")
        return None
    dtype = _DTYPES.get(header["dt"])
    shape = header.get("sh")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FrameError(f"bad tensor description dt={header.get('dt')!r} sh={shape!r}")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(body):
        raise FrameError(f"tensor {shape} {header['dt']} does not match {len(body)} body bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


class FrameReader:
    """Reads frames from `read()` (returns whatever bytes are available, b"" or raises at the end)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read = read
        self._buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self._read()
            if not chunk:
                if self._buf:
                    raise FrameError(f"stream ended inside a frame ({len(self._buf)} of {n} bytes)")
                raise StreamClosed()
            self._buf += chunk

    async def read_frame(self) -> Frame:
        await self._fill(_PREFIX.size)
        head_len, body_len = _PREFIX.unpack_from(self._buf)
        if head_len > MAX_HEADER or body_len > MAX_BODY:
            raise FrameError(f"frame exceeds limits (header {head_len} B, body {body_len} B)")
        total = _PREFIX.size + head_len + body_len
        await self._fill(total)
        raw = bytes(self._buf[:total])
        del self._buf[:total]
        try:
            header = msgpack.unpackb(raw[_PREFIX.size : _PREFIX.size + head_len], raw=False)
        except Exception as e:
            raise FrameError(f"undecodable frame header: {type(e).__name__}") from e
        if not isinstance(header, dict):
            raise FrameError("frame header is not a map")
        return Frame(header, decode_body(header, raw[_PREFIX.size + head_len :]))
