"""Hostile and broken input, fuzzed: wire frames and ring headers, gossip payloads, HTTP bodies.

Pure parsers get hypothesis directly; then a real agent process gets fuzzed ring streams over libp2p
and fuzzed HTTP bodies on every route, and must stay up, log no traceback, keep its memory bounded
and still answer a normal request. Short runs by default; P2PINFER_FUZZ_EXAMPLES=5000 for a long one.
"""

from __future__ import annotations

import json
import os
import random

import msgpack
import multiaddr
import numpy as np
import openai
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.peer.id import ID

from p2pinfer.cluster.announce import Announcer
from p2pinfer.cluster.record import RecordError
from p2pinfer.identity import Identity
from p2pinfer.net.addrs import parse_peer_addr
from p2pinfer.net.host import build_host
from p2pinfer.net.wire import FrameError, FrameReader, StreamClosed, encode_frame
from p2pinfer.serve import protocol as P
from p2pinfer.serve.links import RING_PROTOCOL
from tests.harness import new_secret, wait_for
from tests.test_api_local import raw

EXAMPLES = int(os.environ.get("P2PINFER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
MODEL = "smollm2-135m"

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)  # fmt: skip


def _packable(v) -> bool:
    try:
        msgpack.packb(v, use_bin_type=True)
        return True
    except (OverflowError, TypeError, ValueError):
        return False


# --- pure parsers -------------------------------------------------------------------------------


def _read_all(chunks: list[bytes]) -> list:
    async def main():
        it = iter(chunks)

        async def read() -> bytes:
            return next(it, b"")

        reader, frames = FrameReader(read), []
        try:
            while True:
                frames.append(await reader.read_frame())
        except (FrameError, StreamClosed):
            return frames

    return trio.run(main)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_frame_reader_takes_any_bytes(chunks):
    _read_all(chunks)  # only FrameError / StreamClosed may come out


@FUZZ
@given(st.dictionaries(st.text(max_size=8), values, max_size=6).filter(_packable),
       st.one_of(st.none(), st.sampled_from([np.float32, np.int32, np.float16]).map(lambda t: np.arange(6, dtype=t))))  # fmt: skip
def test_frames_round_trip_and_truncations_fail_cleanly(header, tensor):
    data = encode_frame(header, tensor)
    (frame,) = _read_all([data])
    same = {k: frame.header[k] for k in header}  # the codec adds its tensor keys; NaN != NaN: compare bytes
    assert msgpack.packb(same, use_bin_type=True) == msgpack.packb(header, use_bin_type=True)
    assert (frame.tensor is None) == (tensor is None) and (
        tensor is None or np.array_equal(frame.tensor, tensor)
    )
    assert _read_all([data[: len(data) // 2]]) == []


open_headers = st.fixed_dictionaries(
    {"t": st.just(P.OPEN)},
    optional={
        k: values for k in ("rid", "model", "n_layers", "ring", "i", "sampling", "stop_ids", "max_new", "ctx")
    },
)


@FUZZ
@given(st.one_of(open_headers, st.dictionaries(st.text(max_size=8), values, max_size=10)))
def test_open_header_parser_raises_only_protocol_errors(header):
    try:
        P.OpenRequest.from_header(header)
    except P.ProtocolError:
        pass


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300), values.filter(_packable).map(lambda v: msgpack.packb(v, use_bin_type=True))
    )
)
def test_gossip_validator_raises_only_record_errors(data):
    me = Identity(b"\x05" * 32)
    announcer = Announcer(me.peer_id.to_base58(), me.signing_key, b"\x01" * 32, dict, 6.0)
    try:
        announcer.check(data)
    except RecordError:
        pass


# --- a real agent ---------------------------------------------------------------------------------


def _ring_payloads(rng: random.Random, agent_id: str) -> list[bytes]:
    """Byte strings to write on a ring stream: junk, truncated frames, and well-framed hostile headers."""
    ring = [[agent_id, 0, 30]]
    good = {"t": P.OPEN, "rid": "r", "model": MODEL, "n_layers": 30, "ring": ring, "i": 0,
            "sampling": {"temperature": 0.0}, "stop_ids": [2], "max_new": 1, "ctx": 8}  # fmt: skip
    mutations = [("ctx", 2**40), ("max_new", -1), ("ring", [[agent_id, 0, 10**9]]), ("ring", "x"),
                 ("model", "nope"), ("n_layers", 7), ("sampling", {"temperature": "hot"}), ("sampling", {"bogus": 1}),
                 ("i", 5), ("stop_ids", [None]), ("rid", ""), ("ring", [["12D3KooWnope", 0, 30]])]  # fmt: skip
    out = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))) for _ in range(10)]
    out.append(b"\xff\xff\xff\xff" + b"\x00" * 8)  # a length far over the limits
    for k, v in mutations:
        out.append(encode_frame({**good, k: v}))
    out.append(
        encode_frame({"t": P.DATA, "rid": "unknown"}) + encode_frame({"t": P.HIDDEN}, np.zeros(3, np.float32))
    )
    out.append(encode_frame({"t": "??"}))
    out.append(
        encode_frame({**good, "rid": "ok"}) + encode_frame({"t": P.START}, np.array([1.5], np.float32))
    )
    out.append(encode_frame({**good, "rid": "ok2"}) + encode_frame({"t": P.START}))  # start without a prompt
    data = encode_frame(good)
    out.append(data[: len(data) - 3])  # truncated
    for _ in range(20):
        h = {
            rng.choice(list(good)): rng.choice([None, -1, 2**63, "x", [], {}, 1.5, b"\x00"]) for _ in range(3)
        }
        out.append(encode_frame({**good, **h, "rid": f"f{rng.random()}"}))
    return out


async def _hammer_ring(agent_addr: str, secret: bytes, agent_id: str) -> None:
    me = Identity(b"\x43" * 32)
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = build_host(me.key_pair, secret, listen)
    async with host.run(listen):
        await host.connect(parse_peer_addr(agent_addr))
        for payload in _ring_payloads(random.Random(7), agent_id):
            try:
                stream = await host.new_stream(ID.from_base58(agent_id), [RING_PROTOCOL])
                await stream.write(payload)
                with trio.move_on_after(0.5):
                    await stream.read(65536)  # whatever error frame comes back
                await stream.close()
            except Exception:  # the agent may reset a stream it finds malformed: that is the point
                pass


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


http_bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["model", "messages", "prompt", "stream", "stop", "temperature", "top_p", "n",
                                     "logprobs", "top_logprobs", "seed", "p2pinfer", "stream_options", "min_p"]),
                    values, max_size=6)
    .map(lambda d: {**d, "max_tokens": 1}).filter(_packable).map(lambda d: json.dumps(d, default=str).encode()),
)  # fmt: skip


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.harness import AgentProcess

    secret = new_secret()
    a = AgentProcess(tmp_path_factory.mktemp("fuzz"), "a", secret_hex=secret).start()
    a.fuzz_secret = bytes.fromhex(secret)
    try:
        a.wait_ready(120)
        yield a
    finally:
        a.stop()


def test_fuzzed_ring_streams_leave_the_agent_running(target):
    a = target
    c = openai.OpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0, timeout=300)

    def still_serves() -> None:
        assert c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        ).choices

    still_serves()  # the model is loaded: what follows measures the fuzzing alone
    rss = [_rss_kib(a.proc.pid)]
    for _ in range(2):
        trio.run(_hammer_ring, a.addr, a.fuzz_secret, a.peer_id)
        assert a.proc.poll() is None
        assert a.get("/health")["status"] == "ok"
        wait_for(lambda: next(p for p in a.get("/v1/cluster")["peers"] if p["self"])["active_requests"] == 0, 10,
                 what="every fuzzed session to be gone")  # fmt: skip
        still_serves()
        rss.append(_rss_kib(a.proc.pid))
    assert "Traceback" not in a.log()
    assert rss[1] - rss[0] < 100 * 1024 and rss[2] - rss[1] < 30 * 1024, (
        f"memory grew under fuzzing: {rss} KiB"
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/requests/x",
                                  "/v1/cluster", "/nope"])  # fmt: skip
def test_fuzzed_http_bodies_get_clear_errors(target, path):
    a = target

    @settings(max_examples=max(20, EXAMPLES // 4), deadline=None, suppress_health_check=list(HealthCheck))
    @given(http_bodies, st.sampled_from(["POST", "GET", "PUT", "DELETE"]))
    def one(body, method):
        status, headers, data = raw(a, method, path, body, {"Content-Type": "application/json"})
        assert status < 500 or status == 503, (status, data[:300])
        if status >= 400 and path.startswith("/v1/") and data:
            err = json.loads(data)["error"]  # OpenAI's error shape, with a message that says why
            assert err["message"]

    one()
    assert a.proc.poll() is None and "Traceback" not in a.log()
