"""A GGUF file as a list of verifiable chunks, grouped in parts a layer range can ask for.

A model is named by the sha256 of its file. That hash cannot verify a partial download, so a peer
holding the file also computes a *manifest*: the file's size and sha256, its layer count, and one
entry per chunk (offset, length, part, sha256 of the bytes). The manifest's own sha256 is its *root*
(a torrent's infohash): records gossip (name, file sha256, root), a fetcher takes the manifest from
any peer, checks it against the root, and then every chunk against the manifest before one byte of
it is used.

Chunks follow the file's layout, never straddling two tensors: the header (metadata, tokenizer,
tensor directory) is cut in CHUNK pieces, then each tensor on its own. So a range's chunks are
exactly its tensors' bytes (plus the header), and the alignment padding between tensors, which
nobody reads, is never sent.

Parts: a layer index (tensors `blk.N.*`), or META (the header and any tensor the loader does not
name), EMBED (`token_embd.weight`), HEAD (`output_norm.weight`, `output.weight`). A shard of layers
[a, b) needs those layers, META, EMBED if a == 0 or (b == n and the head is tied to the embedding),
and HEAD if b == n.
"""

from __future__ import annotations

import hashlib
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import msgpack

CHUNK = 1 << 20  # 1 MiB: a lost chunk costs little, and the hash list stays ~50 bytes per MiB
META, EMBED, HEAD = -1, -2, -3
MAX_MANIFEST_BYTES = 16 << 20  # 300k chunks: a 300 GB model
MAX_FILE_BYTES = 1 << 40
_LAYER = re.compile(r"^blk\.(\d+)\.")


class ManifestError(Exception):
    """A manifest (or a file's layout) that cannot be used; the message says why."""


def part_of(tensor_name: str) -> int:
    m = _LAYER.match(tensor_name)
    if m:
        return int(m.group(1))
    if tensor_name == "token_embd.weight":
        return EMBED
    if tensor_name in ("output_norm.weight", "output.weight"):
        return HEAD
    return META


def parts_for(n_layers: int, tied: bool, start: int, end: int) -> frozenset[int]:
    """The parts a shard of layers [start, end) needs."""
    parts = {META, *range(start, end)}
    if start == 0 or (end == n_layers and tied):
        parts.add(EMBED)
    if end == n_layers:
        parts.add(HEAD)
    return frozenset(parts)


def ranges(parts) -> list[list[int]]:
    """Sorted ints as half-open ranges [[a, b), ...] (what records gossip)."""
    out: list[list[int]] = []
    for p in sorted(parts):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


MAX_LAYERS = 4096  # more than any model has: a record claiming parts beyond it is refused
MAX_RANGES = 64


def from_ranges(rs) -> frozenset[int]:
    """Part ranges as a peer's record gossips them; ValueError for anything outside sane bounds (a peer's
    record must not make us build huge sets)."""
    if len(rs) > MAX_RANGES:
        raise ValueError(f"{len(rs)} part ranges (at most {MAX_RANGES})")
    out: set[int] = set()
    for a, b in rs:
        if not (isinstance(a, int) and isinstance(b, int) and HEAD <= a < b <= MAX_LAYERS):
            raise ValueError(f"bad part range {a!r}..{b!r}")
        out.update(range(a, b))
    return frozenset(out)


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    part: int
    sha256: bytes = b""


def layout(gguf) -> tuple[list[Chunk], int, bool]:
    """Chunks (without hashes) of an open GGUFFile, its layer count and whether the head is tied."""
    chunks = [Chunk(o, min(CHUNK, gguf.data_offset - o), META) for o in range(0, gguf.data_offset, CHUNK)]
    n_layers = 0
    for t in sorted(gguf.tensors.values(), key=lambda t: t.offset):
        part = part_of(t.name)
        n_layers = max(n_layers, part + 1)
        chunks += [Chunk(o, min(CHUNK, t.offset + t.n_bytes - o), part)
                   for o in range(t.offset, t.offset + t.n_bytes, CHUNK)]  # fmt: skip
    tied = "output.weight" not in gguf.tensors
    return chunks, n_layers, tied


@dataclass(frozen=True)
class Manifest:
    size: int
    sha256: str  # of the whole file: the model's name on the wire
    n_layers: int
    tied: bool
    chunks: tuple[Chunk, ...]

    def encode(self) -> bytes:
        return msgpack.packb(
            {"v": 1, "size": self.size, "sha256": self.sha256, "n_layers": self.n_layers, "tied": self.tied,
             "chunks": [[c.offset, c.length, c.part, c.sha256] for c in self.chunks]},
            use_bin_type=True,
        )  # fmt: skip

    def chunks_of(self, parts) -> list[int]:
        return [i for i, c in enumerate(self.chunks) if c.part in parts]

    def parts(self) -> frozenset[int]:
        return frozenset(c.part for c in self.chunks)

    def complete_parts(self, have) -> frozenset[int]:
        """Parts every chunk of which is in `have`."""
        missing = {c.part for i, c in enumerate(self.chunks) if i not in have}
        return self.parts() - missing


def root_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def decode(raw: bytes, root: str) -> Manifest:
    """The manifest in `raw`, if it hashes to `root` and is well formed; ManifestError otherwise."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
    if root_of(raw) != root:
        raise ManifestError("manifest does not match its root hash")
    try:
        d = msgpack.unpackb(raw, raw=False, max_bin_len=64, strict_map_key=True)
        size, sha, n_layers, tied = d["size"], d["sha256"], d["n_layers"], d["tied"]
        chunks = tuple(Chunk(int(o), int(n), int(p), bytes(h)) for o, n, p, h in d["chunks"])
        if d.get("v") != 1 or not isinstance(sha, str) or not isinstance(tied, bool):
            raise ValueError("bad version or field types")
    except Exception as e:
        raise ManifestError(f"undecodable manifest: {type(e).__name__}: {e}") from e
    if not (
        isinstance(size, int) and 0 < size <= MAX_FILE_BYTES and isinstance(n_layers, int) and n_layers >= 1
    ):
        raise ManifestError(f"manifest declares a bad size {size!r} or layer count {n_layers!r}")
    end = 0
    for c in chunks:
        if c.offset < end or not 0 < c.length <= CHUNK or c.offset + c.length > size:
            raise ManifestError(f"manifest chunk at {c.offset} (+{c.length}) overlaps or leaves the file")
        if not HEAD <= c.part < n_layers or len(c.sha256) != 32:
            raise ManifestError(f"manifest chunk at {c.offset} has a bad part {c.part} or hash")
        end = c.offset + c.length
    if not chunks or chunks[0].offset != 0 or chunks[0].part != META:
        raise ManifestError("manifest does not start with the file's header")
    return Manifest(size, sha, n_layers, tied, chunks)


def check_layout(manifest: Manifest, gguf) -> None:
    """The header a fetcher verified must describe the same chunks the manifest lists (sizes and
    offsets come from the signed layout, never from a peer's say-so)."""
    chunks, n_layers, tied = layout(gguf)
    declared = [(c.offset, c.length, c.part) for c in manifest.chunks]
    if declared != [(c.offset, c.length, c.part) for c in chunks] or (n_layers, tied) != (
        manifest.n_layers,
        manifest.tied,
    ):
        raise ManifestError("manifest does not match the layout in the model's header")


def build(path: Path) -> Manifest:
    """Hash a local GGUF file (the whole file, then every chunk): seconds for a GB, so run it in a thread."""
    from p2pinfer.engine.gguf_file import GGUFFile

    g = GGUFFile(path)
    try:
        chunks, n_layers, tied = layout(g)
    finally:
        g.close()
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        whole = hashlib.file_digest(f, "sha256").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            hashed = tuple(
                Chunk(c.offset, c.length, c.part, hashlib.sha256(mm[c.offset : c.offset + c.length]).digest())
                for c in chunks
            )
    return Manifest(size, whole, n_layers, tied, hashed)
