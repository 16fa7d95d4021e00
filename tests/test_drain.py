"""Graceful drain: SIGTERM stops new work at once, lets the stream in flight finish, then leaves and
exits 0; a second signal cuts the drain short. Real agents in processes, the official client."""

from __future__ import annotations

import signal
import time

import openai
import pytest

from tests.harness import AgentProcess, new_secret, wait_for
from tests.test_api_local import raw

MODEL = "smollm2-135m"
# a raw completion that keeps counting (no chat turn to end): a stream long enough to drain while others look
COUNTING = dict(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", max_tokens=600, temperature=0)


def _client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="x", timeout=300, max_retries=0)


@pytest.fixture
def pair(tmp_path):
    secret = new_secret()
    a = AgentProcess(tmp_path, "a", "--drain-timeout", "60", secret_hex=secret).start()
    agents = [a]
    try:
        a.wait_ready(120)
        b = AgentProcess(tmp_path, "b", "--bootstrap", a.addr, secret_hex=secret).start()
        agents.append(b)
        b.wait_ready(120)
        wait_for(lambda: a.view() == {a.peer_id, b.peer_id}, 20, what="a and b see each other")
        yield a, b
    finally:
        for x in agents:
            x.stop()


def test_sigterm_drains_the_stream_in_flight_and_refuses_new_work(pair):
    a, b = pair
    a_id = a.peer_id  # asks a: read it while a is up
    reference = _client(a).completions.create(**COUNTING).choices[0].text
    pieces, finish, refused = [], None, None
    for chunk in _client(a).completions.create(**COUNTING, stream=True):
        if not chunk.choices:
            continue
        pieces.append(chunk.choices[0].text or "")
        finish = chunk.choices[0].finish_reason or finish
        if refused is None and len(pieces) >= 4:
            a.signal(signal.SIGTERM)
            wait_for(lambda: a.get("/health")["status"] == "draining", 5, what="a to say it drains")
            status, headers, body = raw(a, "POST", "/v1/chat/completions", b'{"model": "smollm2-135m", '
                                        b'"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}',
                                        {"Content-Type": "application/json"})  # fmt: skip
            refused = status
            assert status == 503 and headers.get("retry-after"), (status, body)
            # the rest of the cluster learns it at once and stops electing a
            wait_for(lambda: any(p["draining"] for p in b.get("/v1/cluster")["peers"] if p["peer_id"] == a_id),
                     5, what="b to see a draining")  # fmt: skip
    assert refused == 503
    assert "".join(pieces) == reference and finish in ("stop", "length")
    assert a.proc.wait(30) == 0
    log = a.log()
    assert "drained in" in log and "cut off" not in log
    assert "Traceback" not in log
    wait_for(lambda: a_id not in b.view(), 5, what="b to drop a after its leave")


def test_second_signal_cuts_the_drain_short(pair):
    a, _b = pair
    stream = _client(a).completions.create(**{**COUNTING, "max_tokens": 2000}, stream=True)
    got = 0
    t0 = None
    try:
        for _chunk in stream:
            got += 1
            if got == 3:
                a.signal(signal.SIGTERM)
                wait_for(lambda: "draining" in a.log(), 5, what="a to start draining")
                t0 = time.monotonic()
                a.signal(signal.SIGTERM)
    except openai.APIError:
        pass  # the stream is cut when the agent leaves
    assert t0 is not None
    assert a.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15  # not the 60 s drain timeout
    assert "cut off" in a.log() and "Traceback" not in a.log()
