"""A member killed mid-request: the entry elects a new ring without it and replays; the client sees one answer."""

from __future__ import annotations

import signal

import openai
import pytest

from tests.harness import AgentProcess, new_secret, wait_for
from tests.test_ring_api import LIMIT, MODEL

pytestmark = pytest.mark.slow

PROMPT = "Write a short story about a lighthouse keeper."
MAX_TOKENS = 160  # long enough that the ring is still generating when the victim dies, at ~200 tok/s


def test_member_killed_mid_request_is_routed_around(tmp_path):
    secret = new_secret()
    agents: list[AgentProcess] = []
    try:
        first = AgentProcess(
            tmp_path, "p0", "--memory-limit", LIMIT, "--peer-ttl", "4", secret_hex=secret
        ).start()
        agents.append(first)
        first.wait_ready()
        for i in range(1, 4):  # four peers, three needed: one spare to route around a loss
            agents.append(AgentProcess(tmp_path, f"p{i}", "--memory-limit", LIMIT, "--peer-ttl", "4",
                                       "--bootstrap", first.addr, secret_hex=secret).start())  # fmt: skip
        for a in agents:
            a.wait_ready()
        ids = {a.peer_id: a for a in agents}
        for a in agents:
            wait_for(lambda a=a: a.view() == set(ids), 20, what=f"{a.name} sees all four")
        entry = agents[0]
        client = openai.OpenAI(base_url=entry.url + "/v1", api_key="x", timeout=900, max_retries=0)
        kw = dict(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0
        )

        # warm run: the reference answer, and every member has its shard loaded
        reference = client.chat.completions.create(**kw).choices[0].message.content
        assert reference

        pieces, victim, victim_id, finish = [], None, None, None
        for chunk in client.chat.completions.create(**kw, stream=True):
            if not chunk.choices:
                continue
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            if victim is None and len(pieces) >= 6:
                rings = entry.get("/v1/cluster")["rings"]
                assert len(rings) == 1, rings
                members = [m[0] for m in next(iter(rings.values()))]
                victim_id = next(p for p in members if p != entry.peer_id)
                victim = ids[victim_id]
                victim.signal(signal.SIGKILL)
        assert victim is not None, "the answer finished before a member could be killed"
        assert "".join(pieces) == reference
        assert finish in ("stop", "length")
        log = entry.log()
        assert f"member {victim_id} failed" in log
        assert "replaying" in log
        for a in agents:
            if a is not victim:
                assert a.proc.poll() is None, f"{a.name} died"
                assert "Traceback" not in a.log(), a.log()[-2000:]
    finally:
        for a in agents:
            a.stop()
