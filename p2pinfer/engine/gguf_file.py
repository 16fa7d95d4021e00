"""A lean GGUF reader: metadata and tensor directory parsed from the mmapped header, tensors as zero-copy views.

Why not gguf.GGUFReader: it turns every array element of the header into numpy parts up front (for
SmolLM2's 49k-token vocabulary and 49k merges: 147k part objects, 3-8 s per open), and a peer opens a
model file at every start (catalog) and every shard load. Here arrays of numbers are single numpy views
and arrays of strings are decoded only when asked for, so opening a file costs milliseconds.

Format (GGUF v2/v3, little-endian): magic, version u32, tensor count u64, kv count u64, kv pairs
(key string, type u32, value), tensor infos (name, n_dims u32, dims u64 x n innermost first, type u32,
offset u64), then tensor data aligned to `general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9
_FLOAT_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.F64: np.float64}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # zero-copy view: float types typed (rows, cols), block types uint8 (rows, bytes per row)
    offset: int = 0  # where its bytes start in the file (p2pinfer/weights chunks the file by tensor)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class _Strings:
    """An array of GGUF strings, decoded on first use (a vocabulary nobody asks for costs nothing)."""

    def __init__(self, buf, pos: int, count: int):
        self._buf, self._pos, self.count = buf, pos, count
        self._values: list[str] | None = None

    def values(self) -> list[str]:
        if self._values is None:
            buf, pos, out = self._buf, self._pos, []
            for _ in range(self.count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                out.append(bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"))
                pos += 8 + n
            self._values = out
        return self._values


class GGUFFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelFileError(f"GGUF file not found: {self.path}") from None
        except (OSError, ValueError) as e:
            raise ModelFileError(f"cannot read GGUF file {self.path}: {e}") from e
        self._buf = memoryview(self._mm)
        try:
            self.fields, self.tensors = self._parse()
        except (struct.error, ValueError, IndexError, KeyError, OverflowError) as e:
            raise ModelFileError(f"{self.path} is not a valid GGUF file (truncated or corrupt: {e})") from e

    # ---- parsing ------------------------------------------------------------------------------------
    def _parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        buf = self._buf
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} not supported")
        pos, fields = 24, {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            fields[key], pos = self._value(kind, pos + 4)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(int(d) for d in dims), GGMLQuantizationType(kind), offset))
        align = int(fields.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
        self.data_offset = start  # the header (metadata + tensor infos) ends before this
        tensors = {}
        for name, dims, qtype, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            cols, rows = dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = cols // block * block_bytes
            lo = start + offset
            if lo + rows * row_bytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            raw = np.frombuffer(self._mm, dtype=np.uint8, count=rows * row_bytes, offset=lo)
            if qtype in _FLOAT_NUMPY:
                data = raw.view(_FLOAT_NUMPY[qtype]).reshape(tuple(reversed(dims)))
            else:
                data = raw.reshape(rows, row_bytes)
            tensors[name] = TensorInfo(name, dims, qtype, data, lo)
        return fields, tensors

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, pos)
        return bytes(self._buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def _value(self, kind: int, pos: int) -> tuple[Any, int]:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            return struct.unpack_from(fmt, self._buf, pos)[0], pos + struct.calcsize(fmt)
        if kind == _STRING:
            return self._string(pos)
        if kind == _ARRAY:
            sub, count = struct.unpack_from("<IQ", self._buf, pos)
            pos += 12
            if sub in _NUMPY:
                arr = np.frombuffer(self._mm, dtype=_NUMPY[sub], count=count, offset=pos)
                return arr, pos + arr.nbytes
            if sub == _STRING:
                strings, p = _Strings(self._buf, pos, count), pos
                for _ in range(count):  # only skip over them now
                    (n,) = struct.unpack_from("<Q", self._buf, p)
                    p += 8 + n
                return strings, p
            raise ValueError(f"arrays of type {sub} are not supported")
        raise ValueError(f"unknown value type {kind}")

    # ---- access -------------------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value: scalars as Python values, arrays as lists (as gguf-py's contents() gives them)."""
        value = self.fields.get(key, default)
        if isinstance(value, _Strings):
            return value.values()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def array_length(self, key: str) -> int | None:
        value = self.fields.get(key)
        return value.count if isinstance(value, _Strings) else len(value) if isinstance(value, np.ndarray) else None

    def close(self) -> None:
        self.tensors, self.fields = {}, {}
        self._buf.release()
        try:
            self._mm.close()
        except BufferError:  # numpy views handed out still point into it: the mapping goes with them
            pass
