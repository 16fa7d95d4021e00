"""One frame per hop per token (serve/protocol.py): the sampled token rides the ring's own frames to the
entry's member, which alone reports it; a gateway entry hears from the last member. In one process, on
the toy model of tests/inproc.py."""

from __future__ import annotations

from collections import Counter

import pytest

from p2pinfer.serve import protocol as P
from p2pinfer.serve.entry import Generation
from p2pinfer.serve.links import LinkClosed
from p2pinfer.serve.member import Member
from tests.inproc import MODEL, Cluster, expected_tokens
from tests.test_serve_inproc import GREEDY, PROMPT, collect, run

N = 30


async def _answer(nursery, entry_pos, logprobs=None):
    c = Cluster(nursery, 4, memory=50 << 20)  # rings of 3 of the 4 peers
    ring = [m.peer_id for m in c.entry("p0").elect(MODEL)]
    gateway = next(p for p in c.ids if p not in ring)
    at = gateway if entry_pos is None else ring[entry_pos]
    sampling = dict(GREEDY, **({"logprobs": logprobs} if logprobs else {}))
    events = []
    async with c.entry(at).generate(Generation(MODEL, list(PROMPT), N, sampling, (), request_id="r")) as rx:
        async for ev in rx:
            events.append(ev)
            if ev.kind != "token":
                break
    return c, ring, at, events, await c.settled()


@pytest.mark.parametrize("entry_pos", [0, 1, 2, None], ids=["first", "middle", "last", "gateway"])
def test_each_token_crosses_each_hop_once_and_reaches_the_entry_once(entry_pos):
    c, ring, at, events, open_sessions = run(_answer, entry_pos)
    assert [e.token for e in events if e.kind == "token"] == expected_tokens(PROMPT, N)
    assert events[-1].kind == "done" and events[-1].reason == "length" and open_sessions == 0
    k, chunks = len(ring), -(-len(PROMPT) // P.WIRE_PREFILL_CHUNK)
    data = Counter((a, b, t) for kind, a, b, t in c.frames if kind == "data" and t != P.DATA)
    for i in range(k - 1):  # prompt chunks, then one h per token but the last, then the end
        assert data[(ring[i], ring[i + 1], P.HIDDEN)] == chunks + N - 1
        assert data[(ring[i], ring[i + 1], P.DONE)] == 1
    assert data[(ring[-1], ring[0], P.TOK)] == N - 1 and data[(ring[-1], ring[0], P.DONE)] == 1
    assert sum(data.values()) == (k - 1) * (chunks + N) + N  # nothing else crossed the ring
    reporter = ring[-1] if entry_pos is None else at
    tokens = Counter((a, b) for kind, a, b, t in c.frames if kind == "control" and t == P.TOK)
    assert tokens == {(reporter, at): N}  # the entry heard each token once, from its own member if any


@pytest.mark.parametrize("entry_pos", [0, 1, None], ids=["first", "middle", "gateway"])
def test_logprobs_ride_with_the_token(entry_pos):
    _, _, _, events, _ = run(_answer, entry_pos, 2)
    tokens = [e for e in events if e.kind == "token"]
    assert [e.token for e in tokens] == expected_tokens(PROMPT, N)
    assert all(e.logprob is not None and e.logprob <= 0 and len(e.top) == 2 for e in tokens)


def test_a_stop_token_ends_every_members_part():
    stop = expected_tokens(PROMPT, N)[7]

    async def main(nursery):
        c = Cluster(nursery, 3, memory=50 << 20)
        g = Generation(MODEL, list(PROMPT), N, dict(GREEDY), (stop,), request_id="s")
        got = await collect(c.entry("p1"), g)
        return got, await c.settled()

    (tokens, reason), open_sessions = run(main)
    assert tokens == expected_tokens(PROMPT, N)[:7] and reason == "stop" and open_sessions == 0


@pytest.mark.parametrize("header", [{"t": "tok", "id": "x"}, {"t": "tok", "id": 3, "lp": "a"},
                                    {"t": "h", "id": 3, "lp": 0.0, "top": [[1]]}, {"t": "done", "id": [1]}])  # fmt: skip
def test_malformed_token_fields_end_the_link_not_the_member(header):
    """LinkClosed drops the link it came on (the entry then routes around); nothing else may escape."""
    with pytest.raises(P.ProtocolError):
        P.token_fields(header)
    with pytest.raises(LinkClosed):
        Member._fields(header)
    assert P.token_fields({"t": "h", "last": True}) == {}  # a frame without a token carries none
