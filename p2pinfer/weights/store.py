"""Fetched chunks on disk: one sparse file per model, the size of the original, holding only the chunks
fetched so far at their own offsets, so the GGUF loader and the tokenizer read it as if it were whole.

    <data dir>/weights/<file sha256>.gguf       sparse: header + the tensors of the shards fetched
    <data dir>/weights/<file sha256>.manifest   the verified manifest (its sha256 is the root)
    <data dir>/weights/<file sha256>.have       indices of the chunks written, one per line, appended
                                                only after the chunk's bytes are in the file
    <data dir>/weights/hashes.json              manifests of local files, by path + size + mtime

After a crash, `.have` says what is there (a chunk is re-checked against its hash when the model is
opened again), so a transfer resumes where it stopped. `--cache-limit` caps the bytes held, evicting
whole models least recently used first (never one in use). Every call here does file I/O: run them
in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from .manifest import Manifest, ManifestError, build, decode, root_of

log = logging.getLogger("p2pinfer.weights")


class CachedModel:
    """One model's sparse file and the chunks it holds (verified)."""

    def __init__(self, directory: Path, manifest: Manifest, raw: bytes) -> None:
        self.manifest, self.raw, self.root = manifest, raw, root_of(raw)
        base = directory / manifest.sha256
        self.path = base.with_suffix(".gguf")
        self._have_path = base.with_suffix(".have")
        self.have: set[int] = set()
        self.last_used = time.time()
        self._lock = threading.Lock()
        base.with_suffix(".manifest").write_bytes(raw)
        if not self.path.exists() or self.path.stat().st_size != manifest.size:
            with open(self.path, "wb") as f:
                f.truncate(manifest.size)  # sparse: no blocks until chunks are written
            self._have_path.unlink(missing_ok=True)
        self._load_have()

    def _load_have(self) -> None:
        try:
            listed = {int(x) for x in self._have_path.read_text().split()}
        except (OSError, ValueError):
            listed = set()
        chunks = self.manifest.chunks
        with open(self.path, "rb") as f:
            for i in sorted(listed):
                if 0 <= i < len(chunks):
                    c = chunks[i]
                    if hashlib.sha256(os.pread(f.fileno(), c.length, c.offset)).digest() == c.sha256:
                        self.have.add(i)
        if len(self.have) != len(listed):
            log.warning("cached %s: %d of %d chunks listed failed their hash; fetching them again",
                        self.manifest.sha256[:12], len(listed) - len(self.have), len(listed))  # fmt: skip
        self._have_path.write_text("".join(f"{i}\n" for i in sorted(self.have)))

    def held_bytes(self) -> int:
        return sum(self.manifest.chunks[i].length for i in self.have)

    def write(self, index: int, data: bytes) -> None:
        """Store a chunk whose hash the caller verified."""
        c = self.manifest.chunks[index]
        assert len(data) == c.length
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, c.offset)
            finally:
                os.close(fd)
            with open(self._have_path, "a") as f:
                f.write(f"{index}\n")
            self.have.add(index)
        self.last_used = time.time()

    def read(self, index: int) -> bytes:
        c = self.manifest.chunks[index]
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), c.length, c.offset)

    def remove(self) -> None:
        for p in (self.path, self._have_path, self.path.with_suffix(".manifest")):
            p.unlink(missing_ok=True)


class WeightStore:
    def __init__(self, data_dir: Path, cache_limit: int | None = None) -> None:
        self.dir = Path(data_dir) / "weights"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_limit = cache_limit
        self.cached: dict[str, CachedModel] = {}  # root -> model

    # --- local files: hashed once, remembered by path + size + mtime ---------
    def manifest_of_file(self, path: Path) -> tuple[Manifest, bytes]:
        st = Path(path).stat()
        key = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        index_path = self.dir / "hashes.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        if isinstance(index.get(key), str):
            try:
                raw = (self.dir / f"{index[key]}.files-manifest").read_bytes()
                return decode(raw, index[key]), raw
            except (OSError, ManifestError):
                pass
        t0 = time.monotonic()
        manifest = build(Path(path))
        raw = manifest.encode()
        root = root_of(raw)
        (self.dir / f"{root}.files-manifest").write_bytes(raw)
        index[key] = root
        index_path.write_text(json.dumps(index, indent=1))
        log.info("hashed %s (%.0f MB, %d chunks) in %.1f s: sha256 %s", path, manifest.size / 1e6,
                 len(manifest.chunks), time.monotonic() - t0, manifest.sha256[:16])  # fmt: skip
        return manifest, raw

    # --- the cache of fetched chunks ------------------------------------------
    def open_existing(self) -> list[CachedModel]:
        """Reopen what earlier runs fetched (their chunks re-checked)."""
        for mpath in sorted(self.dir.glob("*.manifest")):
            raw = mpath.read_bytes()
            try:
                manifest = decode(raw, root_of(raw))
            except ManifestError as e:
                log.warning("dropping cached %s: %s", mpath.name, e)
                continue
            if manifest.sha256 != mpath.stem:
                continue
            self.cached[root_of(raw)] = CachedModel(self.dir, manifest, raw)
        return list(self.cached.values())

    def open(self, manifest: Manifest, raw: bytes) -> CachedModel:
        root = root_of(raw)
        if root not in self.cached:
            self.cached[root] = CachedModel(self.dir, manifest, raw)
        return self.cached[root]

    def held_bytes(self) -> int:
        return sum(m.held_bytes() for m in self.cached.values())

    def evict(self, keep: set[str]) -> list[str]:
        """Drop least recently used models (not those in `keep`, by root) until under the limit."""
        dropped = []
        if self.cache_limit is None:
            return dropped
        for m in sorted(self.cached.values(), key=lambda m: m.last_used):
            if self.held_bytes() <= self.cache_limit:
                break
            if m.root in keep:
                continue
            log.info("cache over --cache-limit: evicting fetched model %s (%.0f MB)", m.manifest.sha256[:12],
                     m.held_bytes() / 1e6)  # fmt: skip
            m.remove()
            del self.cached[m.root]
            dropped.append(m.root)
        return dropped
