"""The per-request ring behind the OpenAI endpoint: real agents in processes, the official openai client."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from tests.harness import AgentProcess, three_peers_and_a_keyed_gateway, wait_for

MODEL = "smollm2-135m"
LIMIT = "100M"  # SmolLM2 needs ~220 MB with KV headroom (packed weights): three such peers, not two
PROMPTS = ["What is the capital of France?", "Name three colours.", "Count from one to five."]
MAX_TOKENS = 24
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three computing peers whose memory limit forces a three-peer ring, plus a keyed gateway."""
    with three_peers_and_a_keyed_gateway(tmp_path_factory.mktemp("ring"), LIMIT, API_KEY) as agents:
        a, b, c, gw = agents["a"], agents["b"], agents["c"], agents["gw"]
        gw_id = wait_for(lambda: gw.get("/health", headers={"Authorization": f"Bearer {API_KEY}"}), 60,
                         what="gateway health")["peer_id"]  # fmt: skip
        ids = {a.peer_id, b.peer_id, c.peer_id, gw_id}
        for x in (a, b, c):
            wait_for(lambda x=x: x.view() == ids, 20, what=f"{x.name} to see all four")
        yield agents


@pytest.fixture(scope="module")
def reference():
    """Greedy answers of the unsplit model run by the engine in this process."""
    from p2pinfer.engine import ModelCatalog, Shard, Tokenizer

    entry = ModelCatalog().get(MODEL)
    tok = Tokenizer.from_entry(entry)
    shard = Shard.load(entry, 0, entry.n_layers, max_sessions=1, max_context=512)
    answers = {}
    for i, prompt in enumerate(PROMPTS):
        ids = tok.render_chat([{"role": "user", "content": prompt}])
        shard.open_session(str(i), len(ids) + MAX_TOKENS)
        logits, out = shard.forward(str(i), np.array(ids, dtype=np.int32)), []
        for _ in range(MAX_TOKENS):
            t = int(np.argmax(logits))
            if t in tok.eos_token_ids:
                break
            out.append(t)
            if len(out) == MAX_TOKENS:
                break
            logits = shard.forward(str(i), np.array([t], dtype=np.int32))
        shard.close_session(str(i))
        answers[prompt] = tok.decode(out)
    return answers


def client_for(agent: AgentProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key=key, timeout=600, max_retries=0)


def ask(client: openai.OpenAI, prompt: str, stream: bool) -> tuple[str, str]:
    kw = dict(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = [], None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_three_peer_ring_matches_single_peer_engine(cluster, reference):
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    # ask a peer; then find which peer is first in the ring and check the client was not talking to it
    results = {}
    for prompt in PROMPTS:
        for stream in (False, True):
            results[(prompt, stream)] = ask(client_for(b), prompt, stream)
    held = {}
    for x in (a, b, c):
        me = next(p for p in x.get("/v1/cluster")["peers"] if p["self"])
        held[x.name] = [tuple(r) for r in me["layers"] if r[0] == MODEL]
    ranges = sorted(r for rs in held.values() for r in rs)
    assert [r[1:] for r in ranges][0][0] == 0 and ranges[-1][2] == 30, ranges
    assert all(ranges[i][2] == ranges[i + 1][1] for i in range(len(ranges) - 1)), ranges
    assert all(held[n] for n in "abc"), f"every peer holds layers: {held}"
    first = next(n for n, rs in held.items() if any(r[1] == 0 for r in rs))
    entry_name = "b" if first != "b" else "c"
    if first == "b":  # the ring put b first: ask through c as well so the entry is not the first member
        for prompt in PROMPTS:
            results[(prompt, False)] = ask(client_for(c), prompt, False)
    assert entry_name != first
    for (prompt, stream), (text, finish) in results.items():
        assert text == reference[prompt], (prompt, stream, text, reference[prompt])
        assert finish in ("stop", "length")
    # another peer's view shows the layer ranges of every member
    view = {p["peer_id"]: p["layers"] for p in a.get("/v1/cluster")["peers"]}
    assert sum(len(v) for v in view.values()) >= 3
    # hidden states crossed the ring's links: every member counted bytes both ways (/metrics); the last
    # member sends only tokens, the others float32 hidden states
    moved = {}
    for x in (a, b, c):
        with urllib.request.urlopen(f"{x.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        moved[x.name] = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("p2pinfer_link_bytes_total{")}  # fmt: skip
    assert all(m["sent"] > 0 and m["received"] > 0 for m in moved.values()), moved
    assert sum(m["received"] for m in moved.values()) > 100_000, moved


def test_gateway_serves_request_computed_elsewhere(cluster, reference):
    gw = cluster["gw"]
    text, _ = ask(client_for(gw, API_KEY), PROMPTS[0], stream=True)
    assert text == reference[PROMPTS[0]]
    me = next(
        p for p in gw.get("/v1/cluster", headers={"Authorization": f"Bearer {API_KEY}"})["peers"] if p["self"]
    )
    assert me["layers"] == [] and me["can_compute"] is False


def test_four_concurrent_streams_complete(cluster, reference):
    a = cluster["a"]
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        client = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key="x", timeout=600, max_retries=0)
        prompt = PROMPTS[i % len(PROMPTS)]
        text = []
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True)  # fmt: skip
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
        results[i] = "".join(text)

    async def amain():
        await asyncio.gather(*(one(i) for i in range(4)))

    before = sum(_carried_several(x) for x in (cluster["a"], cluster["b"], cluster["c"]))
    asyncio.run(amain())
    assert len(results) == 4
    # the members stepped sessions together (continuous batching), and every answer is what it is alone
    assert sum(_carried_several(x) for x in (cluster["a"], cluster["b"], cluster["c"])) > before
    for i, text in results.items():
        assert text == reference[PROMPTS[i % len(PROMPTS)]], (i, text)


def _carried_several(agent: AgentProcess) -> float:
    """Decode steps of this peer that carried more than one session (/metrics)."""
    steps = _counters(agent, "p2pinfer_decode_steps")
    return sum(v for k, v in steps.items() if int(k) > 1)


def _post(agent: AgentProcess, path: str, body: bytes, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(agent.url + path, data=body, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_nothing_dies(cluster):
    a, gw = cluster["a"], cluster["gw"]
    chat = "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (a, b"{not json", None, 400, None),
        (a, json.dumps({"model": "no-such-model", "messages": msg}).encode(), None, 404, "model_not_found"),
        (a, json.dumps({"model": MODEL, "messages": msg, "max_tokens": -5}).encode(), None, 400, None),
        (a, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}).encode(),
         None, 400, "context_length_exceeded"),
        (a, json.dumps({"model": MODEL, "messages": "nope"}).encode(), None, 400, None),
        (a, json.dumps({"model": MODEL, "messages": msg, "n": 3}).encode(), None, 400, None),
        (gw, json.dumps({"model": MODEL, "messages": msg}).encode(), "wrong-key", 401, "invalid_api_key"),
        (gw, json.dumps({"model": MODEL, "messages": msg}).encode(), None, 401, "invalid_api_key"),
    ]  # fmt: skip
    for agent, body, key, status, code in cases:
        got, err = _post(agent, chat, body, key)
        assert got == status, (body[:80], got, err)
        assert set(err) == {"error"} and err["error"]["message"], err
        if code:
            assert err["error"]["code"] == code, err
    # the official client maps them to its exception classes
    with pytest.raises(openai.NotFoundError):
        client_for(a).chat.completions.create(model="no-such-model", messages=msg)
    with pytest.raises(openai.AuthenticationError):
        client_for(gw, "wrong").chat.completions.create(model=MODEL, messages=msg)
    with pytest.raises(openai.BadRequestError):
        client_for(a).chat.completions.create(model=MODEL, messages=msg, max_tokens=-1)
    for x in cluster.values():
        assert x.proc.poll() is None, f"{x.name} died"
        assert "Traceback" not in x.log(), x.log()[-3000:]


def test_models_and_completions_endpoints(cluster, reference):
    a = cluster["a"]
    models = client_for(a).models.list()
    assert MODEL in [m.id for m in models.data]
    r = client_for(a).completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 5


def _counters(agent: AgentProcess, name: str, headers: dict | None = None) -> dict[str, float]:
    req = urllib.request.Request(f"{agent.url}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(f"{name}_total{{")}  # fmt: skip


def _replays(agent: AgentProcess) -> float:
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("p2pinfer_ring_replays_total "))


def test_a_warm_ring_opens_no_stream(cluster, reference):
    """Ring streams outlive requests (serve/links.py): once a ring has served a request, the next one
    through the same entry opens no stream on any peer, reuses pooled ones, and answers the same."""
    a, b, c, gw = cluster["a"], cluster["b"], cluster["c"], cluster["gw"]
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    for via, key in ((b, "x"), (gw, API_KEY)):  # an entry in the ring, and a gateway outside it
        ask(client_for(via, key), PROMPTS[1], stream=True)  # warms the pools of this entry's ring
        before = {x.name: _counters(x, "p2pinfer_ring_streams", keyed) for x in (a, b, c, gw)}
        for stream in (True, False):
            text, _ = ask(client_for(via, key), PROMPTS[1], stream=stream)
            assert text == reference[PROMPTS[1]]
        after = {x.name: _counters(x, "p2pinfer_ring_streams", keyed) for x in (a, b, c, gw)}
        assert {n: after[n]["opened"] for n in after} == {n: before[n]["opened"] for n in before}, (before, after)
        reused = sum(after[n]["reused"] - before[n]["reused"] for n in after)
        # two requests, each: the entry's control links to remote members, the members' data links
        remote_controls = 2 if via is b else 3
        assert reused >= 2 * (remote_controls + 2), (via.name, before, after)


def test_a_restarted_member_is_reached_afresh_not_through_its_dead_streams(cluster, reference):
    """A member killed between requests leaves dead streams in its neighbours' pools; once it is back
    (same identity), the next request goes round without a replay. Last in this module: it restarts b."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    ask(client_for(a), PROMPTS[2], stream=False)  # pools to b are warm
    replays = _replays(a)
    b.proc.kill()
    b.proc.wait()
    b.start()
    b.wait_ready()
    ids = {x.peer_id for x in (a, b, c)}
    for x in (a, b, c):
        wait_for(lambda x=x: ids <= x.view(), 30, what=f"{x.name} to see the ring again")
    text, _ = ask(client_for(a), PROMPTS[2], stream=False)
    assert text == reference[PROMPTS[2]]
    assert _replays(a) == replays
