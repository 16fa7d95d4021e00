"""Weights travel peer to peer: serve the chunks of the models we hold, fetch those of a shard we lack.

A peer that holds a model's file (or chunks of it in its cache) gossips, in its signed record,
(name, file sha256, manifest root, size, parts it can serve): see weights/manifest.py. A peer told
to serve layers [a, b) of a model it has no file for:

1. picks the root most peers gossip for that name (ties: the smaller root);
2. fetches the manifest from one of them and checks it against the root;
3. fetches the header chunks (META) into a sparse copy of the file, checks the header describes the
   manifest's layout exactly, and adds a catalog entry pointing at the sparse file (this is all a
   gateway needs to tokenize);
4. fetches the chunks of the parts its range needs from every peer that gossips them, two streams per
   peer, each chunk checked against its hash before it is written; a peer whose chunk fails is logged
   and avoided (AVOID_SECONDS), its chunk fetched again from another; a peer that drops just loses
   its chunks in flight to the others;
5. then the engine loads the range from the sparse file as from any other.

Trust: records are signed by their peer's key and carry the cluster's membership MAC, so only an
admitted peer can announce a root. A fetcher believes the majority root for a name; after that no
byte is used before it matches a hash that the root vouches for. An admitted peer that lies about a
root can still make a fetcher refuse to fetch (its manifest won't verify), not make it compute on
forged weights, unless the liars are the majority of the peers holding that model.

Uploads are paced by --upload-limit, shared by all streams. Hashing and file I/O run in threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pinfer.cluster.record import PeerRecord
from p2pinfer.engine import EngineError, ModelCatalog, ModelEntry
from p2pinfer.net import blobs
from p2pinfer.weights.manifest import (
    MAX_MANIFEST_BYTES,
    META,
    Manifest,
    ManifestError,
    check_layout,
    decode,
    from_ranges,
    parts_for,
    ranges,
)
from p2pinfer.weights.store import CachedModel, WeightStore

log = logging.getLogger("p2pinfer.fetch")

PROTOCOL = "/p2pinfer/weights/1.0.0"
STREAMS_PER_PEER = 4
AVOID_SECONDS = 600.0
CHUNK_TIMEOUT = 60.0  # a peer that sends no chunk for this long is dropped, its chunks go to the others

# Upload pace while this peer computes for a ring and no --upload-limit is set: measured here, a holder
# decoded at 0.52x while a peer pulled its chunks unpaced, 0.98x at 20 MiB/s (benchmarks/transfer.py --contention).
BUSY_UPLOAD_RATE = 20 << 20


class FetchError(EngineError):
    """A model's bytes could not be fetched; the message says why."""


@dataclass
class Served:
    """A model this peer can upload chunks of: a whole local file, or its cache of fetched chunks."""

    name: str
    manifest: Manifest
    raw: bytes
    root: str
    path: Path
    cached: CachedModel | None = None

    def parts(self) -> frozenset[int]:
        if self.cached is None:
            return self.manifest.parts()
        return self.manifest.complete_parts(self.cached.have)

    def has(self, i: int) -> bool:
        return self.cached is None or i in self.cached.have

    def read(self, i: int) -> bytes:
        c = self.manifest.chunks[i]
        with open(self.path, "rb") as f:
            f.seek(c.offset)
            return f.read(c.length)


class WeightService:
    def __init__(self, net: blobs.Blobs, self_id: str, catalog: ModelCatalog, store: WeightStore,
                 records: Callable[[], list[PeerRecord]], upload_limit: int | None,
                 on_change: Callable[[], None], can_fetch: bool = True,
                 busy: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.net, self.self_id, self.catalog, self.store = net, self_id, catalog, store
        self.records, self.on_change, self.can_fetch = records, on_change, can_fetch
        self.served: dict[str, Served] = {}  # root -> what we upload
        self.fetched: dict[str, Served] = {}  # name -> a model whose catalog entry is our sparse file
        self._avoid: dict[tuple[str, str], float] = {}  # (root, peer) -> until when
        self._locks: dict[str, trio.Lock] = {}
        self._names_path = store.dir / "names.json"
        self.fetched_bytes = 0  # downloaded and verified, over this run (benchmarks, tests, logs)
        # tokens before bytes: without --upload-limit, uploads are paced only while this peer serves a ring
        net.serve(PROTOCOL, self._handle, blobs.RateLimit(upload_limit, busy_rate=BUSY_UPLOAD_RATE, busy=busy))

    # --- start-up: hash local files, reopen the cache ---------------------------------------------
    async def run(self) -> None:
        for entry in self.catalog.list():
            if entry.format != "gguf":
                continue  # HF directories are served from local files only (see the note in README)
            try:
                manifest, raw = await trio.to_thread.run_sync(self.store.manifest_of_file, Path(entry.path))
            except (OSError, ManifestError, EngineError) as e:
                log.warning("cannot offer %s to peers: %s", entry.name, e)
                continue
            s = Served(entry.name, manifest, raw, _root(raw), Path(entry.path))
            self.served[s.root] = s
        names = self._read_names()
        for m in await trio.to_thread.run_sync(self.store.open_existing):
            name = names.get(m.root)
            if name and m.root not in self.served:
                self.served[m.root] = Served(name, m.manifest, m.raw, m.root, m.path, m)
        self.on_change()

    def _read_names(self) -> dict[str, str]:
        try:
            d = json.loads(self._names_path.read_text())
            return {str(k): str(v) for k, v in d.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _remember_name(self, root: str, name: str) -> None:
        names = self._read_names()
        names[root] = name
        self._names_path.write_text(json.dumps(names, indent=1))

    # --- what our record says ------------------------------------------------------------------------
    def record_fields(self) -> dict:
        weights = []
        for s in sorted(self.served.values(), key=lambda s: (s.name, s.root)):
            parts = s.parts()
            if parts:
                weights.append((s.name, s.manifest.sha256, s.root, s.manifest.size,
                                tuple(tuple(r) for r in ranges(parts))))  # fmt: skip
        return {"weights": tuple(weights), "fetches": self.can_fetch}

    # --- uploads -------------------------------------------------------------------------------------
    async def _handle(self, peer: str, req: dict) -> tuple[dict, bytes]:
        root = req.get("root")
        s = self.served.get(root) if isinstance(root, str) else None
        if s is None:
            raise ValueError("no such model here")
        if req.get("manifest") is True:
            return {}, s.raw
        i = req.get("i")
        if type(i) is not int or not 0 <= i < len(s.manifest.chunks):
            raise ValueError(f"chunk {str(i)[:20]} is outside the model's layout")
        if not s.has(i):
            raise ValueError(f"chunk {i} is not held here")
        return {}, await trio.to_thread.run_sync(s.read, i)

    # --- finding sources -----------------------------------------------------------------------------
    def _sources(self, name: str, root: str | None = None) -> tuple[str, list[tuple[str, frozenset[int]]]]:
        """(root, [(peer, parts)]) for `name`: the root most peers gossip (or `root`), peers to avoid left out."""
        by_root: dict[str, list[tuple[str, frozenset[int]]]] = {}
        now = time.monotonic()
        for r in self.records():
            if r.peer_id == self.self_id or r.leave:
                continue
            for w in r.weights:
                if w[0] != name:
                    continue
                try:
                    parts = from_ranges(w[4])
                except ValueError:
                    continue
                if self._avoid.get((w[2], r.peer_id), 0) > now:
                    by_root.setdefault(w[2], [])
                    continue
                by_root.setdefault(w[2], []).append((r.peer_id, parts))
        if root is None:
            if not by_root:
                return "", []
            root = min(by_root, key=lambda k: (-len(by_root[k]), k))
        return root, by_root.get(root, [])

    def _lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    # --- catalog entries for models we have no file of ---------------------------------------------
    async def ensure_entry(self, name: str) -> None:
        """Give the catalog an entry for `name` if it lacks one and some peer serves the model: the
        manifest and the header (tokenizer, layout) are fetched; no-op otherwise (the caller's
        catalog.get then says the model is unknown)."""
        if name in {e.name for e in self.catalog.list()} or not isinstance(name, str):
            return
        async with self._lock(name):
            if name in {e.name for e in self.catalog.list()}:
                return
            root, peers = self._sources(name)
            if not root:
                return
            cached = await self._open(name, root, peers)
            s = Served(name, cached.manifest, cached.raw, root, cached.path, cached)
            await self._fetch(s, frozenset({META}), None)
            entry = await trio.to_thread.run_sync(_describe, cached, name)
            self.served[root] = s
            self.fetched[name] = s
            self.catalog.add_remote(entry)
            log.info("model %s (sha256 %s) known from peers: header fetched, layers on demand",
                     name, cached.manifest.sha256[:16])  # fmt: skip
            self.on_change()

    async def _open(self, name: str, root: str, peers: list[tuple[str, frozenset[int]]]) -> CachedModel:
        if root in self.store.cached:
            return self.store.cached[root]
        for peer, _parts in peers:
            try:
                async with self.net.client(peer, PROTOCOL) as c:
                    _, raw = await c.request({"root": root, "manifest": True}, MAX_MANIFEST_BYTES)
                manifest = decode(raw, root)
            except blobs.BlobError as e:
                log.info("no manifest of %s from %s: %s", name, peer, e)
                continue
            except ManifestError as e:
                log.warning("peer %s served a bad manifest of %s: %s; avoiding it", peer, name, e)
                self._avoid[(root, peer)] = time.monotonic() + AVOID_SECONDS
                continue
            cached = await trio.to_thread.run_sync(self.store.open, manifest, raw)
            await trio.to_thread.run_sync(self._remember_name, root, name)
            return cached
        raise FetchError(f"no peer could send the manifest of {name}")

    # --- the ShardHost hook: a range's bytes before it loads ---------------------------------------
    async def prepare(self, entry: ModelEntry, start: int, end: int,
                      report: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        """Fetch what layers [start, end) of `entry` need, unless the model is a local file here."""
        s = self.fetched.get(entry.name)
        if s is None:
            return
        m = s.manifest
        await self._fetch(s, parts_for(m.n_layers, m.tied, start, end), report)
        dropped = await trio.to_thread.run_sync(self.store.evict, {s.root})
        for root in dropped:
            gone = self.served.pop(root, None)
            if gone is not None and self.fetched.get(gone.name) is gone:
                del self.fetched[gone.name]
                self.catalog.remove(gone.name)

    async def _fetch(
        self, s: Served, parts: frozenset[int], report: Callable[[int, int], None] | None
    ) -> None:
        assert s.cached is not None
        cached, m = s.cached, s.manifest
        wanted = m.chunks_of(parts)
        total = sum(m.chunks[i].length for i in wanted)
        async with self._lock(s.root):
            pending = {i for i in wanted if i not in cached.have}
            if not pending:
                return
            done = total - sum(m.chunks[i].length for i in pending)
            t0, already, got = time.monotonic(), done, 0
            header = sum(m.chunks[i].length for i in m.chunks_of({META}))
            if already > header:  # more than the header fetched with the catalog entry: an earlier run's
                log.info("fetching %s: resuming, %.1f of %.1f MB already here", s.name, already / 1e6,
                         total / 1e6)  # fmt: skip
            _, peers = self._sources(s.name, s.root)
            peers = [(p, parts_) for p, parts_ in peers if parts_ & parts]
            if report is not None:
                report(done, total)

            inflight, told = [0], [done * 10 // total]
            changed = [trio.Event()]

            def settle() -> None:
                changed[0].set()
                changed[0] = trio.Event()

            async def worker(peer: str, has: frozenset[int]) -> None:
                nonlocal done, got
                try:
                    async with self.net.client(peer, PROTOCOL) as client:
                        while self._avoid.get((s.root, peer), 0) <= time.monotonic():
                            i = next((i for i in sorted(pending) if m.chunks[i].part in has), None)
                            if i is None:
                                if not inflight[0]:
                                    return
                                await changed[0].wait()  # a chunk in flight elsewhere may fail and come back
                                continue
                            pending.discard(i)
                            inflight[0] += 1
                            try:
                                with trio.fail_after(CHUNK_TIMEOUT):
                                    _, body = await client.request(
                                        {"root": s.root, "i": i}, m.chunks[i].length
                                    )
                                ok = await trio.to_thread.run_sync(_verify_and_write, cached, i, body)
                            except BaseException:
                                pending.add(i)
                                raise
                            finally:
                                inflight[0] -= 1
                                settle()
                            if not ok:
                                pending.add(i)
                                self._avoid[(s.root, peer)] = time.monotonic() + AVOID_SECONDS
                                log.warning("peer %s served a corrupted chunk %d of %s (%d bytes at offset %d): "
                                            "avoiding it for %.0f s", peer, i, s.name, len(body), m.chunks[i].offset,
                                            AVOID_SECONDS)  # fmt: skip
                                return
                            done += len(body)
                            got += len(body)
                            self.fetched_bytes += len(body)
                            if report is not None:
                                report(done, total)
                            if done * 10 // total != told[0]:  # our record shows the fetch in tenths
                                told[0] = done * 10 // total
                                self.on_change()
                except (blobs.BlobError, trio.TooSlowError) as e:
                    log.info(
                        "fetching %s from %s stopped: %s", s.name, peer, e or "no chunk within the timeout"
                    )

            async with trio.open_nursery() as nursery:
                for peer, has in peers:
                    for _ in range(STREAMS_PER_PEER):
                        nursery.start_soon(worker, peer, has)
            if pending:
                raise FetchError(f"{len(pending)} chunks of {s.name} could not be fetched: no peer left that "
                                 f"serves them ({len(peers)} tried)")  # fmt: skip
            dt = time.monotonic() - t0
            log.info("fetched %s parts %s: %.1f MB in %.2f s (%.1f MB/s) from %d peer(s), %.1f MB were here",
                     s.name, ranges(parts), got / 1e6, dt, got / 1e6 / max(dt, 1e-9), len(peers),
                     already / 1e6)  # fmt: skip
        self.on_change()


def _root(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _verify_and_write(cached: CachedModel, i: int, body: bytes) -> bool:
    c = cached.manifest.chunks[i]
    if len(body) != c.length or hashlib.sha256(body).digest() != c.sha256:
        return False
    cached.write(i, body)
    return True


def _describe(cached: CachedModel, name: str) -> ModelEntry:
    """The catalog entry of a sparse file whose header was fetched, once the header matches the manifest."""
    from p2pinfer.engine.catalog import describe
    from p2pinfer.engine.gguf_file import GGUFFile

    g = GGUFFile(cached.path)
    try:
        check_layout(cached.manifest, g)
    except ManifestError as e:
        raise FetchError(f"{name}: {e}") from e
    finally:
        g.close()
    return describe(cached.path, name)
