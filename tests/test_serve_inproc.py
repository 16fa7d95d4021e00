"""serve/ in one process: the real EntryService and Members on in-memory links with a toy model
(tests/inproc.py). Rings, replays, cancels and timeouts in milliseconds, where the real-process
tests take minutes."""

from __future__ import annotations

import logging

import pytest
import trio

from p2pinfer.serve import entry as entry_mod
from p2pinfer.serve.entry import Generation
from p2pinfer.serve.failures import Failure, FailureKind
from tests.inproc import MODEL, Cluster, expected_tokens

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}
PROMPT = [5, 17, 42, 8, 3] * 60  # 300 tokens: several wire prefill chunks


def gen(max_new: int = 40, prompt=PROMPT, rid: str = "r1") -> Generation:
    return Generation(MODEL, list(prompt), max_new, dict(GREEDY), (), request_id=rid)


async def collect(entry, g: Generation, on_token=None, cancel=None) -> tuple[list[int], str]:
    """Tokens and how the request ended ("length"/"stop", or the failure's kind)."""
    tokens: list[int] = []
    async with entry.generate(g, cancel=cancel) as events:
        async for ev in events:
            if ev.kind == "token":
                tokens.append(ev.token)
                if on_token is not None:
                    await on_token(len(tokens))
            elif ev.kind == "done":
                return tokens, ev.reason
            else:
                return tokens, ev.error.kind.value
    return tokens, "closed"


def run(fn, *args):
    async def main():
        async with trio.open_nursery() as nursery:
            result = await fn(nursery, *args)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def test_toy_model_is_consistent_with_its_oracle():
    assert len(set(expected_tokens(PROMPT, 40))) > 10  # not a constant: a wrong split would show


@pytest.mark.parametrize("peers,memory_mib", [(1, 400), (2, 120), (3, 50)])
def test_rings_of_any_size_answer_like_a_lone_peer(peers, memory_mib):
    async def main(nursery):
        c = Cluster(nursery, peers, memory=memory_mib << 20)
        e = c.entry("p0")
        tokens, reason = await collect(e, gen())
        return tokens, reason, len(e.elect(MODEL)), await c.settled()

    tokens, reason, ring_size, open_sessions = run(main)
    assert ring_size == peers
    assert (tokens, reason) == (expected_tokens(PROMPT, 40), "length")
    assert open_sessions == 0  # every member freed its session


def test_a_member_killed_mid_request_is_routed_around_with_the_same_answer(caplog):
    caplog.set_level(logging.INFO)

    async def main(nursery):
        c = Cluster(nursery, 4, memory=50 << 20, step_delay=0.001)
        e = c.entry("p0")
        first = e.elect(MODEL)
        victim = first[1].peer_id  # a member that is not the entry

        async def on_token(n):
            if n == 10:
                c.kill(victim)

        tokens, reason = await collect(e, gen(), on_token)
        return tokens, reason, victim, first

    tokens, reason, victim, first = run(main)
    assert (tokens, reason) == (expected_tokens(PROMPT, 40), "length")
    assert any("replaying" in r.message for r in caplog.records), "no replay logged"
    assert any(victim in r.message for r in caplog.records if "failed" in r.message)


def test_cancel_ends_the_stream_with_cancelled_and_frees_every_session():
    async def main(nursery):
        c = Cluster(nursery, 3, memory=50 << 20, step_delay=0.002)
        e = c.entry("p1")
        scope = trio.CancelScope()

        async def on_token(n):
            if n == 5:
                scope.cancel()

        tokens, how = await collect(e, gen(max_new=200), on_token, cancel=scope)
        return tokens, how, await c.settled(), e.active

    tokens, how, open_sessions, active = run(main)
    assert how == FailureKind.CANCELLED.value and 5 <= len(tokens) < 200
    assert tokens == expected_tokens(PROMPT, len(tokens))
    assert open_sessions == 0 and active == 0


def test_a_consumer_leaving_early_frees_every_session():
    async def main(nursery):
        c = Cluster(nursery, 3, memory=50 << 20, step_delay=0.002)
        e = c.entry("p0")
        async with e.generate(gen(max_new=500)) as events:
            async for ev in events:
                if ev.kind == "token":
                    break  # a stop string, a client gone
        return await c.settled(), e.active

    assert run(main) == (0, 0)


def test_no_ring_fits_is_unavailable_before_anything_streams(monkeypatch):
    monkeypatch.setattr(entry_mod, "ELECT_GRACE", 0.2)

    async def main(nursery):
        c = Cluster(nursery, 2, memory=10 << 20)  # 2 x 10 MiB < the model
        with pytest.raises(Failure) as err:
            await collect(c.entry("p0"), gen())
        return err.value

    e = run(main)
    assert e.kind is FailureKind.UNAVAILABLE and e.retry_after


def test_a_busy_entry_says_busy_and_a_draining_one_unavailable():
    async def main(nursery):
        c = Cluster(nursery, 1, memory=400 << 20, step_delay=0.01)
        e = c.entry("p0", max_requests=1)
        kinds = []
        async with e.generate(gen(max_new=100, rid="a")):
            with pytest.raises(Failure) as err:
                async with e.generate(gen(rid="b")):
                    pass
            kinds.append(err.value.kind)
        e.draining = True
        with pytest.raises(Failure) as err:
            async with e.generate(gen(rid="c")):
                pass
        kinds.append(err.value.kind)
        return kinds

    assert run(main) == [FailureKind.BUSY, FailureKind.UNAVAILABLE]


def test_a_stalled_ring_times_out(monkeypatch):
    monkeypatch.setattr(entry_mod, "TOKEN_TIMEOUT", 0.3)
    monkeypatch.setattr(entry_mod, "FIRST_TOKEN_TIMEOUT", 0.3)

    async def main(nursery):
        c = Cluster(nursery, 2, memory=120 << 20, step_delay=0.001)
        e = c.entry("p0")

        async def on_token(n):
            if n == 3:
                c.hosts["p1"].stall = trio.Event()  # p1's engine wedges: alive, but no tokens come

        with trio.fail_after(10):
            result = await collect(e, gen(max_new=100), on_token)
        c.hosts["p1"].stall.set()
        return result

    tokens, how = run(main)
    assert how == FailureKind.TIMEOUT.value and 3 <= len(tokens) < 100


def test_a_member_that_refuses_is_routed_around():
    async def main(nursery):
        c = Cluster(nursery, 3, memory=120 << 20)
        e = c.entry("p0")
        ring = e.elect(MODEL)
        c.members[ring[-1].peer_id].draining = True  # it answers "unavailable" to the open
        tokens, reason = await collect(e, gen())
        return tokens, reason, c.hosts[ring[-1].peer_id].calls

    tokens, reason, refused_calls = run(main)
    assert (tokens, reason) == (expected_tokens(PROMPT, 40), "length")
    assert refused_calls == 0  # the refusing member computed nothing: the answer came from a ring without it


def test_six_failures_in_a_row_without_a_token_give_up(monkeypatch):
    monkeypatch.setattr(entry_mod, "REPLAY_BACKOFF", 0.0)

    async def main(nursery):
        c = Cluster(nursery, 2, memory=120 << 20)
        for m in c.members.values():
            m.draining = True  # every member refuses every ring
        return await collect(c.entry("p0"), gen())

    tokens, how = run(main)
    assert tokens == [] and how == FailureKind.UNAVAILABLE.value


# --- the Generator on top: text, stop strings, logprobs, the request book ---------------------------


class LetterTokenizer:
    """Token id n is the letter chr(97 + n % 26); text encodes back letter by letter."""

    eos_token_ids = ()

    def encode(self, text: str) -> list[int]:
        return [ord(ch) - 97 for ch in text if ch.isalpha()]

    def render_chat(self, messages) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))

    def token_bytes(self, tid: int) -> bytes:
        return chr(97 + tid % 26).encode()

    _token_bytes = token_bytes

    def decoder(self):
        from p2pinfer.engine.tokenizer import IncrementalDecoder

        return IncrementalDecoder(self)


def generator_for(c: Cluster, peer: str = "p0"):
    from p2pinfer.serve.generate import Generator
    from p2pinfer.serve.metrics import Metrics
    from tests.inproc import ToyCatalog

    g = Generator(ToyCatalog(), c.entry(peer), Metrics(), MODEL.name)
    g._tokenizers[MODEL.name] = LetterTokenizer()
    return g


def letters(ids) -> str:
    return "".join(chr(97 + t % 26) for t in ids)


def test_the_generator_cuts_at_a_stop_string_and_frees_the_ring():
    from p2pinfer.serve.generate import Delta, Finish, TextRequest

    prompt = "thequickbrownfox" * 10
    ids = [ord(ch) - 97 for ch in prompt]
    full = letters(expected_tokens(ids, 60))
    stop = full[20:23]
    cut = full.index(stop)

    async def main(nursery):
        c = Cluster(nursery, 3, memory=50 << 20)
        g = generator_for(c)
        p = await g.prepare(TextRequest(prompt, max_tokens=60, sampling={"temperature": 0}, stops=(stop,),
                                        logprobs=2, id="req-1"))  # fmt: skip
        text, lps, finish = "", [], None
        async with g.generate(p) as stream:
            async for item in stream:
                if isinstance(item, Delta):
                    text += item.text
                    lps += item.logprobs
                else:
                    finish = item
        return text, lps, finish, g.book.get("req-1"), await c.settled()

    text, lps, finish, track, open_sessions = run(main)
    assert text == full[:cut] and isinstance(finish, Finish) and finish.reason == "stop"
    assert finish.completion_tokens == track.tokens >= cut and track.state == "done"
    assert len(lps) == finish.completion_tokens and all(len(x.top) == 2 and x.logprob <= 0 for x in lps)
    assert open_sessions == 0


def test_cancel_by_id_ends_the_stream_with_cancelled():
    from p2pinfer.serve.generate import Delta, TextRequest

    async def main(nursery):
        c = Cluster(nursery, 2, memory=120 << 20, step_delay=0.002)
        g = generator_for(c)
        p = await g.prepare(TextRequest("abc" * 50, max_tokens=500, sampling={"temperature": 0}, id="req-2"))
        got = 0
        with pytest.raises(Failure) as err:
            async with g.generate(p) as stream:
                async for item in stream:
                    got += isinstance(item, Delta)
                    if got == 3:
                        g.cancel("req-2")
        with pytest.raises(Failure) as again:
            g.cancel("req-2")
        return err.value.kind, again.value.kind, g.book.get("req-2").state, await c.settled()

    assert run(main) == (FailureKind.CANCELLED, FailureKind.CONFLICT, "cancelled", 0)


def test_prepare_refuses_what_cannot_run():
    from p2pinfer.serve.generate import TextRequest

    async def main(nursery):
        g = generator_for(Cluster(nursery, 1, memory=400 << 20))
        kinds = []
        for req in (TextRequest("abc", model="nope"), TextRequest(""), TextRequest((5, 999)),
                    TextRequest("abc", max_tokens=MODEL.context_length),
                    TextRequest("abc", routing="no-such-policy")):  # fmt: skip
            with pytest.raises(Failure) as err:
                await g.prepare(req)
            kinds.append(err.value.kind)
        return kinds

    K = FailureKind
    assert run(main) == [K.UNKNOWN_MODEL, K.BAD_REQUEST, K.BAD_REQUEST, K.CONTEXT_EXCEEDED, K.BAD_REQUEST]


def test_open_headers_are_typed_both_ways():
    from p2pinfer.serve import protocol as P

    req = P.OpenRequest(rid="r", model="toy", n_layers=12, ring=[["a", 0, 5], ["b", 5, 12]], i=1,
                        sampling={"temperature": 0.0, "seed": 7, "recent": [1, 2]}, stop_ids=[0], max_new=4,
                        ctx=40)  # fmt: skip
    header = req.to_header()
    assert header["i"] == 1 and header["report"] == 1 and header["sampling"] == {"temperature": 0.0, "seed": 7,
                                                                                  "recent": [1, 2]}  # fmt: skip
    back = P.OpenRequest.from_header(header)
    assert back.model_dump(exclude={"report"}) == req.model_dump(exclude={"report"}) and back.is_last and back.peer_after() == "a" and back.start == 5
    for field, bad in [("i", True), ("i", 2), ("ring", [["a", 0, 5], ["b", 6, 12]]), ("ring", [["a", 0, 11]]),
                       ("sampling", {"temperature": float("inf")}), ("sampling", {"evil": 1}),
                       ("stop_ids", [2**40]), ("max_new", 0), ("rid", ""), ("report", 5)]:  # fmt: skip
        with pytest.raises(P.ProtocolError):
            P.OpenRequest.from_header({**header, field: bad})
