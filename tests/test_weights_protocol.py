"""The weights protocol against bad input: manifests that lie are refused before use, and an agent
answers a peer's malformed transfer requests with errors and keeps serving (a real agent, a real
admitted libp2p peer on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import struct

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

from p2pinfer.identity import Identity
from p2pinfer.net import blobs
from p2pinfer.net.addrs import parse_peer_addr
from p2pinfer.net.host import build_host
from p2pinfer.serve.fetch import PROTOCOL
from p2pinfer.weights.manifest import CHUNK, META, Chunk, Manifest, ManifestError, decode, parts_for, root_of
from tests.harness import new_secret, wait_for


@pytest.fixture(scope="module")
def manifest():
    from p2pinfer.engine.catalog import embedded_model_path
    from p2pinfer.weights.manifest import build

    return build(embedded_model_path())


def test_manifest_round_trip_and_parts(manifest):
    raw = manifest.encode()
    assert decode(raw, root_of(raw)) == manifest
    # a range's chunks are its tensors plus the header, each chunk inside one tensor
    first = set(manifest.chunks_of(parts_for(manifest.n_layers, manifest.tied, 0, 10)))
    last = set(manifest.chunks_of(parts_for(manifest.n_layers, manifest.tied, 10, manifest.n_layers)))
    header = set(manifest.chunks_of({META}))
    assert first & last >= header and all(manifest.chunks[i].length <= CHUNK for i in first | last)
    assert first | last == set(range(len(manifest.chunks)))  # together, every chunk of the file


def test_part_ranges_from_records_are_bounded():
    from p2pinfer.weights.manifest import from_ranges, ranges

    assert from_ranges(ranges({-3, -2, -1, 0, 1, 7})) == {-3, -2, -1, 0, 1, 7}
    for bad in ([[0, 10**9]], [[-9, 0]], [[3, 3]], [["a", 2]], [[i, i + 1] for i in range(100)]):
        with pytest.raises(ValueError):
            from_ranges(bad)


def test_manifests_that_lie_are_refused(manifest):
    raw = manifest.encode()
    with pytest.raises(ManifestError, match="root"):
        decode(raw, "0" * 64)  # not the root gossiped
    c0 = manifest.chunks[0]

    def forged(chunks) -> bytes:
        return Manifest(
            manifest.size, manifest.sha256, manifest.n_layers, manifest.tied, tuple(chunks)
        ).encode()

    bad = {
        "past the end": [c0, Chunk(manifest.size - 10, 100, 0, b"\0" * 32)],
        "overlapping": [c0, Chunk(c0.offset + 1, 10, 0, b"\0" * 32)],
        "oversized": [c0, Chunk(c0.length, CHUNK + 1, 0, b"\0" * 32)],
        "no header": [Chunk(0, 10, 0, b"\0" * 32)],
        "bad part": [c0, Chunk(c0.length, 10, manifest.n_layers, b"\0" * 32)],
    }
    for what, chunks in bad.items():
        r = forged(chunks)
        with pytest.raises(ManifestError):
            decode(r, root_of(r))
        assert what
    with pytest.raises(ManifestError, match="undecodable"):
        decode(b"\x93garbage", root_of(b"\x93garbage"))


async def _answer(stream) -> bytes:
    """What the agent sends back before it closes the stream (b"": nothing)."""
    with trio.move_on_after(5):
        try:
            return await stream.read(100)
        except StreamEOF:
            return b""
    return b"timed out"


async def _hostile(addr: str, secret: bytes, root: str, chunk: Chunk) -> dict:
    me = Identity(b"\x43" * 32)
    host = build_host(me.key_pair, secret, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    out: dict = {}
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = parse_peer_addr(addr)
        await host.connect(info)
        peer = info.peer_id.to_base58()
        async with blobs.BlobClient(host, peer, PROTOCOL) as c:
            for name, req in {
                "unknown root": {"root": "f" * 64, "i": 0},
                "index past the layout": {"root": root, "i": 10**9},
                "negative index": {"root": root, "i": -1},
                "index not an int": {"root": root, "i": "../../etc/passwd"},
                "no root": {"path": "/etc/passwd"},
            }.items():
                try:
                    await c.request(req, CHUNK)
                    out[name] = "answered"
                except blobs.BlobError as e:
                    out[name] = str(e)
            _, body = await c.request({"root": root, "i": 0}, CHUNK)  # the same stream still serves
            out["good"] = hashlib.sha256(body).digest() == chunk.sha256
        # a stream that lies about its request's length is dropped, not read
        stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
        await stream.write(struct.pack(">I", 1 << 30) + b"\x00" * 64)
        out["huge"] = await _answer(stream)
        stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
        await stream.write(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        out["garbage"] = await _answer(stream)
    return out


def test_malformed_transfer_requests_get_errors_and_the_agent_keeps_serving(agents, manifest):
    secret = new_secret()
    a = agents("a", "--no-warm", secret_hex=secret)
    a.wait_ready()
    raw = manifest.encode()
    root = root_of(raw)
    wait_for(lambda: a.get("/v1/cluster")["peers"][0]["weights"], 30, what="a to offer its model")
    out = trio.run(_hostile, a.addr, bytes.fromhex(secret), root, manifest.chunks[0])
    assert "no such model here" in out["unknown root"]
    assert "outside the model's layout" in out["index past the layout"]
    assert "outside the model's layout" in out["negative index"]
    assert "outside the model's layout" in out["index not an int"]
    assert "no such model here" in out["no root"]
    assert out["good"] is True
    assert not out.get("huge") and not out.get("garbage")  # closed without an answer
    wait_for(lambda: "exceeds 4096" in a.log(), 5, what="a log line for the oversized request")
    assert "undecodable message" in a.log()
    assert a.get("/health")["status"] == "ok"


def test_status_table_shows_fetch_progress():
    from rich.console import Console

    from p2pinfer.console import peers_table

    peer = {"peer_id": "12D3KooWabcdef", "self": True, "connected": False, "can_compute": True,
            "memory_free": 1 << 30, "memory_total": 2 << 30, "layers": [],
            "loading": [["smollm2-135m", 15, 30, 0.2]], "fetching": [["smollm2-135m", 15, 30, 13_000_000, 65_000_000]],
            "active_requests": 0, "compute": 1.0, "age": 0.1}  # fmt: skip
    console = Console(width=200, record=True)
    console.print(peers_table({"self": peer["peer_id"], "peers": [peer]}))
    assert "loading smollm2-135m [15, 30) 20% fetched 13/65 MB" in console.export_text()


def test_cache_resumes_from_verified_chunks_and_evicts_over_its_limit(manifest, tmp_path):
    from p2pinfer.engine.catalog import embedded_model_path
    from p2pinfer.weights.store import WeightStore

    raw = manifest.encode()
    data = embedded_model_path().read_bytes()
    store = WeightStore(tmp_path, cache_limit=2 << 20)
    m = store.open(manifest, raw)
    for i in (0, 1, 5):
        c = manifest.chunks[i]
        m.write(i, data[c.offset : c.offset + c.length])
    # a torn write: listed in .have, but the bytes in the file are not the chunk's
    c9 = manifest.chunks[9]
    m.write(9, b"\x00" * c9.length)
    reopened = WeightStore(tmp_path, cache_limit=2 << 20).open_existing()
    assert [r.have for r in reopened] == [{0, 1, 5}]  # the bad chunk is dropped, the good ones stay
    store = WeightStore(tmp_path, cache_limit=2 << 20)
    (again,) = store.open_existing()
    assert again.held_bytes() > 2 << 20
    assert store.evict(keep={again.root}) == []  # in use: kept even over the limit
    assert store.evict(keep=set()) == [again.root]
    assert not again.path.exists() and store.held_bytes() == 0


def test_election_prefers_warm_then_file_then_fetch():
    from p2pinfer.cluster.ring import Candidate, ModelNeeds, elect_ring

    needs = ModelNeeds("m", 4, 100, 10, 10, 0, 0)
    whole = 4 * 100 + 20
    # "a" sorts first by peer id and is more idle, but must fetch: "z" holds the file
    fetcher, holder = Candidate("a", whole, 0, 9.0, fetch=True), Candidate("z", whole, 3, 1.0)
    assert [m.peer_id for m in elect_ring([fetcher, holder], needs)] == ["z"]
    # a fetcher that holds the layers warm (it fetched them before) beats a cold holder
    warm = Candidate("a", whole, 0, 9.0, held=(("m", 0, 4),), fetch=True)
    assert [m.peer_id for m in elect_ring([warm, holder], needs)] == ["a"]
    # two-peer rings: of three peers, the two with the file are taken
    half = 2 * 100 + 10
    peers = [
        Candidate("a", half, 0, 1.0, fetch=True),
        Candidate("b", half, 0, 1.0),
        Candidate("c", half, 0, 1.0),
    ]
    assert {m.peer_id for m in elect_ring(peers, needs)} == {"b", "c"}


def test_a_fetched_range_reports_fetch_then_load_then_warm():
    from p2pinfer.progress import overall

    assert overall({"fetch": (0, 100)}) == 0.0
    assert overall({"fetch": (50, 100)}) == 0.25
    assert overall({"fetch": (100, 100), "load": (10, 10)}) == 0.75
    assert overall({"load": (10, 10)}) == 0.5  # a range read from a local file: as before


def test_uploads_are_paced_only_while_the_peer_serves_a_ring():
    from p2pinfer.net.blobs import RateLimit

    busy = [False]
    limit = RateLimit(None, busy_rate=1 << 20, busy=lambda: busy[0])
    assert limit.current() is None  # idle: full speed
    busy[0] = True
    assert limit.current() == 1 << 20
    assert RateLimit(5 << 20, busy_rate=1 << 20, busy=lambda: True).current() == 5 << 20  # an explicit cap wins

    async def timed(n_bytes: int) -> float:
        t0 = trio.current_time()
        await limit.take(n_bytes)
        return trio.current_time() - t0

    async def main():
        return await timed((1 << 20) + (512 << 10))  # the burst (1 MiB) is free, the rest waits ~0.5 s

    clock = trio.testing.MockClock(autojump_threshold=0)
    waited = trio.run(main, clock=clock)
    assert 0.4 < waited < 0.6
