"""Orchestration against a real agent: fan-out (vote, first, SSE), chains, tasks, OpenAI batches with the
official client (including cancel and resume after a crash), bad input.

One agent serves two models: the embedded SmolLM2 and the same file registered under a second name
(a models dir holding a link to it), so "two models" answer greedy prompts identically and a vote
across them is checkable. The last test adds a second peer to check that fan-out branches spread
over disjoint rings and that link RTTs reach the records.
"""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request

import openai
import pytest

from p2pinfer.engine.catalog import embedded_model_path
from tests.harness import AgentProcess, new_secret, wait_for

MODEL = "smollm2-135m"
TWIN = "smollm2-twin"
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("orch")
    models = work / "models"
    models.mkdir()
    (models / f"{TWIN}.gguf").symlink_to(embedded_model_path())
    secret = new_secret()
    a = AgentProcess(work, "a", "--models-dir", str(models), secret_hex=secret).start()
    try:
        a.wait_ready(120)
        yield {"a": a, "work": work, "models": models, "secret": secret}
    finally:
        a.stop()


def post(agent: AgentProcess, path: str, body, timeout: float = 300) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(agent.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def greedy(agent: AgentProcess, messages, max_tokens: int, model: str = MODEL) -> str:
    r = client(agent).chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content


def test_fanout_vote_across_two_models(env):
    a = env["a"]
    status, body = post(a, "/v1/p2pinfer/fanout", {
        "messages": ASK, "max_tokens": 8, "temperature": 0, "aggregate": "vote",
        "branches": [{"model": MODEL}, {"model": TWIN}, {"model": MODEL, "temperature": 1.5, "seed": 7,
                                                       "top_k": 0, "top_p": 1, "min_p": 0}],
    })  # fmt: skip
    assert status == 200, body
    assert body["state"] == "done" and [b["state"] for b in body["branches"]] == ["done"] * 3
    b0, b1 = body["branches"][0], body["branches"][1]
    assert b0["model"] == MODEL and b1["model"] == TWIN
    assert b0["content"] == b1["content"] == greedy(a, ASK, 8)  # greedy: the same file answers alike
    assert b0["mean_logprob"] is not None and b0["mean_logprob"] <= 0
    top = body["result"]["tally"][0]
    assert top["votes"] >= 2 and {0, 1} <= set(top["branches"])
    assert body["result"]["content"] == b0["content"]
    # the parts are in /v1/requests with their task
    parts = [r for r in a.get("/v1/requests")["data"] if r.get("task") == body["id"]]
    assert sorted(r["part"] for r in parts) == ["branch0", "branch1", "branch2"]
    task = a.get(f"/v1/p2pinfer/tasks/{body['id']}")
    assert task["kind"] == "fanout" and task["state"] == "done" and len(task["parts"]) == 3


def test_fanout_first_streams_events_tagged_by_branch(env):
    a = env["a"]
    req = urllib.request.Request(a.url + "/v1/p2pinfer/fanout", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "The capital of France is", "temperature": 0,
                                                  "aggregate": "first", "stream": True,
                                                  "branches": [{"max_tokens": 40}, {"max_tokens": 2}]}).encode())  # fmt: skip
    events = []
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            if line == "data: [DONE]":
                break
    deltas = [e for e in events if e["type"] == "delta"]
    assert deltas and {e["branch"] for e in deltas} <= {0, 1}
    result = events[-1]
    assert result["type"] == "result" and result["result"]["branch"] == 1  # 2 tokens finish first
    assert result["branches"][0]["state"] == "cancelled"
    text1 = "".join(e["content"] for e in deltas if e["branch"] == 1)
    assert text1 == result["result"]["content"] == result["branches"][1]["content"]


def test_chain_runs_a_dag_with_templates(env):
    a = env["a"]
    first = [{"role": "user", "content": "Name the capital of France. {{input}}"}]
    status, body = post(a, "/v1/p2pinfer/chain", {
        "input": "One word.",
        "steps": [
            {"name": "city", "messages": first, "max_tokens": 6, "temperature": 0},
            {"name": "other", "model": TWIN, "prompt": "Germany's capital is", "max_tokens": 3, "temperature": 0},
            {"name": "final", "messages": [{"role": "user", "content": "Repeat: {{steps.city}} and {{steps.other}}"}],
             "max_tokens": 10, "temperature": 0},
        ],
    })  # fmt: skip
    assert status == 200, body
    steps = {s["name"]: s for s in body["steps"]}
    assert body["state"] == "done" and all(s["state"] == "done" for s in steps.values())
    assert steps["final"]["depends_on"] == ["city", "other"] and steps["city"]["depends_on"] == []
    # independent steps ran in parallel; the dependent one after both
    assert (
        steps["city"]["started"] < steps["other"]["ended"]
        and steps["other"]["started"] < steps["city"]["ended"]
    )
    assert steps["final"]["started"] >= max(steps["city"]["ended"], steps["other"]["ended"])
    city = greedy(a, [{"role": "user", "content": "Name the capital of France. One word."}], 6)
    assert steps["city"]["content"] == city
    want = greedy(a, [{"role": "user", "content": f"Repeat: {city} and {steps['other']['content']}"}], 10)
    assert body["output"] == steps["final"]["content"] == want


def test_chain_streams(env):
    a = env["a"]
    body = {"stream": True, "steps": [{"name": "s1", "prompt": "The capital of France is", "max_tokens": 3,
                                       "temperature": 0},
                                      {"name": "s2", "prompt": "{{steps.s1}} and", "max_tokens": 2, "temperature": 0}]}  # fmt: skip
    req = urllib.request.Request(a.url + "/v1/p2pinfer/chain", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as r:
        events = [json.loads(x[6:]) for x in r.read().decode().split("\n\n") if x.startswith("data: {")]
    result = events[-1]
    assert result["type"] == "result" and result["state"] == "done"
    for name in ("s1", "s2"):
        text = "".join(e["content"] for e in events if e["type"] == "delta" and e["step"] == name)
        assert text == next(s["content"] for s in result["steps"] if s["name"] == name)
    assert [e["step"] for e in events if e["type"] == "step"] == ["s1", "s2"]


def test_cancel_a_task_as_a_whole(env):
    a = env["a"]
    out = {}

    def run():
        out["r"] = post(a, "/v1/p2pinfer/fanout", {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                                                   "seeds": [1, 2]})  # fmt: skip

    t = threading.Thread(target=run)
    t.start()
    tid = wait_for(lambda: next((x["id"] for x in a.get("/v1/p2pinfer/tasks")["data"]
                                 if x["kind"] == "fanout" and x["state"] == "running"), None), 60, what="task")  # fmt: skip
    wait_for(lambda: len(a.get(f"/v1/p2pinfer/tasks/{tid}")["parts"]) == 2, 60, what="both branches")
    t0 = time.monotonic()
    status, body = post(a, f"/v1/p2pinfer/tasks/{tid}/cancel", {})
    assert status == 200 and body["state"] == "cancelled"
    t.join(60)
    assert time.monotonic() - t0 < 10
    status, body = out["r"]
    assert status == 200 and body["state"] == "cancelled"
    assert all(b["state"] == "cancelled" for b in body["branches"])
    assert not [
        r for r in a.get("/v1/requests")["data"] if r.get("task") == tid and r["state"] == "generating"
    ]


def test_delete_one_part_cancels_only_that_part(env):
    a = env["a"]
    out = {}

    def run():
        out["r"] = post(a, "/v1/p2pinfer/fanout", {"prompt": "Once upon a time", "temperature": 0,
                                                   "branches": [{"max_tokens": 400}, {"max_tokens": 12}]})  # fmt: skip

    t = threading.Thread(target=run)
    t.start()
    tid = wait_for(lambda: next((x["id"] for x in a.get("/v1/p2pinfer/tasks")["data"]
                                 if x["kind"] == "fanout" and x["state"] == "running"), None), 60, what="task")  # fmt: skip
    parts = wait_for(lambda: (p := a.get(f"/v1/p2pinfer/tasks/{tid}")["parts"]) and len(p) == 2 and p, 60,
                     what="both branches")  # fmt: skip
    req = urllib.request.Request(a.url + f"/v1/requests/{parts['branch0']}", method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    t.join(120)
    status, body = out["r"]
    assert status == 200 and body["state"] == "done"
    assert [b["state"] for b in body["branches"]] == ["cancelled", "done"]
    assert body["branches"][1]["usage"]["completion_tokens"] == 12


def _batch_file(n: int, max_tokens: int, url: str = "/v1/chat/completions") -> io.BytesIO:
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": url,
              "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 2}."}],
                       "max_tokens": max_tokens, "temperature": 0}} for i in range(n)]  # fmt: skip
    return io.BytesIO("\n".join(json.dumps(x) for x in lines).encode())


def _wait_batch(c: openai.OpenAI, bid: str, timeout: float = 300):
    return wait_for(lambda: (b := c.batches.retrieve(bid)).status in ("completed", "failed", "cancelled") and b,
                    timeout, interval=0.3, what=f"batch {bid}")  # fmt: skip


def test_batch_with_the_official_client(env):
    a = env["a"]
    c = client(a)
    f = c.files.create(file=("in.jsonl", _batch_file(4, 6)), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and c.files.retrieve(f.id).id == f.id
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"who": "test"})  # fmt: skip
    assert b.status in ("validating", "in_progress") and b.metadata == {"who": "test"}
    b = _wait_batch(c, b.id)
    assert b.status == "completed" and b.request_counts.completed == 4 and b.request_counts.failed == 0
    lines = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["q0", "q1", "q2", "q3"]
    q1 = next(x for x in lines if x["custom_id"] == "q1")
    assert q1["response"]["status_code"] == 200
    assert q1["response"]["body"]["choices"][0]["message"]["content"] == greedy(
        a, [{"role": "user", "content": "Count to 3."}], 6
    )
    assert b.id in [x.id for x in c.batches.list().data]
    # a line that fails validation fails the whole batch, with its line number
    bad = c.files.create(file=("bad.jsonl", io.BytesIO(b'{"custom_id": "x", "url": "/v1/completions", "body": {}}\n')),
                         purpose="batch")  # fmt: skip
    b = _wait_batch(c, c.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions",
                                        completion_window="24h").id)  # fmt: skip
    assert b.status == "failed" and b.errors.data[0].line == 1
    # a request the model rejects ends in the error file, the rest of the batch completes
    mixed = io.BytesIO(
        _batch_file(1, 3).getvalue() + b"\n" + json.dumps({"custom_id": "big", "method": "POST",
        "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": ASK, "max_tokens": -1}}).encode())  # fmt: skip
    b = _wait_batch(c, c.batches.create(input_file_id=c.files.create(file=("m.jsonl", mixed), purpose="batch").id,
                                        endpoint="/v1/chat/completions", completion_window="24h").id)  # fmt: skip
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    err = json.loads(c.files.content(b.error_file_id).text)
    assert err["custom_id"] == "big" and err["response"]["status_code"] == 400


def test_batch_cancel(env):
    c = client(env["a"])
    f = c.files.create(file=("in.jsonl", _batch_file(12, 200)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(b.id).status == "in_progress", 60, what="batch running")
    b = c.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled")
    b = _wait_batch(c, b.id, 60)
    assert b.status == "cancelled" and b.cancelled_at and b.request_counts.completed < 12


def test_batch_resumes_after_the_entry_crashes(env):
    a = env["a"]
    c = client(a)
    f = c.files.create(file=("in.jsonl", _batch_file(6, 24)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(
        lambda: c.batches.retrieve(b.id).request_counts.completed >= 1, 120, interval=0.2, what="one done"
    )
    a.proc.kill()  # no goodbye: the state on disk is all there is
    a.proc.wait()
    a.start()
    a.wait_ready(120)
    b = _wait_batch(client(a), b.id)
    assert b.status == "completed" and b.request_counts.completed == 6
    lines = [json.loads(x) for x in client(a).files.content(b.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"q{i}" for i in range(6)]  # each exactly once


@pytest.mark.parametrize("path,body,status", [
    ("/v1/p2pinfer/fanout", {"prompt": "x", "branches": []}, 400),
    ("/v1/p2pinfer/fanout", {"prompt": "x", "models": ["no-such-model"]}, 404),
    ("/v1/p2pinfer/fanout", {"prompt": "x", "seeds": [1], "aggregate": "best"}, 400),
    ("/v1/p2pinfer/fanout", {"prompt": "x", "seeds": [1], "models": [MODEL]}, 400),
    ("/v1/p2pinfer/fanout", {"prompt": "x", "seeds": list(range(20))}, 400),
    ("/v1/p2pinfer/fanout", {"prompt": "x", "seeds": [1], "p2pinfer": {"routing": "cheapest"}}, 400),
    ("/v1/p2pinfer/fanout", [1, 2], 400),
    ("/v1/p2pinfer/fanout", b"{not json", 400),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "{{steps.b}}"}, {"name": "b", "prompt": "{{steps.a}}"}]}, 400),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "{{steps.a}}"}]}, 400),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "{{nope}}"}]}, 400),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"}]}, 400),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "x", "temperature": 5}]}, 400),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "x", "model": "no-such-model"}]}, 404),
    ("/v1/p2pinfer/chain", {"steps": [{"name": "a", "prompt": "x", "retries": 99}]}, 400),
    ("/v1/p2pinfer/chain", {"steps": []}, 400),
    ("/v1/batches", {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, 400),
    ("/v1/batches/batch-000000000000000000000000/cancel", {}, 404),
    ("/v1/p2pinfer/tasks/nope/cancel", {}, 404),
    ("/v1/chat/completions", {"messages": ASK, "p2pinfer": {"routing": "nope"}}, 400),
    ("/v1/chat/completions", {"messages": ASK, "p2pinfer": "latency"}, 400),
])  # fmt: skip
def test_bad_input_is_a_clear_4xx(env, path, body, status):
    got, data = post(env["a"], path, body)
    assert got == status and data["error"]["message"], data


def test_uploads_need_multipart_with_a_key_header_and_a_batch_purpose(env):
    a = env["a"]
    form = (b"--XX\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XX\r\nContent-Disposition: "
            b"form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{}\r\n--XX--\r\n")  # fmt: skip
    for headers, want in (({}, 415), ({"Authorization": "Bearer x"}, 200)):
        req = urllib.request.Request(a.url + "/v1/files", data=form, headers={
            "Content-Type": "multipart/form-data; boundary=XX", **headers})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == want, headers
    with pytest.raises(openai.BadRequestError):
        client(a).files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="assistants")
    with pytest.raises(openai.NotFoundError):
        client(a).files.content("file-000000000000000000000000")


def test_routing_policies_and_a_second_peer(env):
    """Per-request routing works; with two peers, least-loaded fan-out branches run on disjoint rings,
    and the measured link RTT reaches the records and the routing view."""
    a = env["a"]
    for policy in ("memory", "least-loaded", "latency", "fastest"):
        r = client(a).chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0,
                                              extra_body={"p2pinfer": {"routing": policy}})  # fmt: skip
        assert r.choices[0].message.content
    b = AgentProcess(env["work"], "b", "--models-dir", str(env["models"]), "--bootstrap", a.addr,
                     secret_hex=env["secret"]).start()  # fmt: skip
    try:
        b.wait_ready(120)
        ids = {a.peer_id, b.peer_id}
        wait_for(lambda: a.view() == ids, 30, what="a to see b")
        status, body = post(a, "/v1/p2pinfer/fanout", {"messages": ASK, "max_tokens": 4, "temperature": 0,
                                                        "models": [MODEL, MODEL]})  # fmt: skip
        assert status == 200, body
        rings = [tuple(m[0] for m in br["ring"]) for br in body["branches"]]
        assert len(rings) == 2 and not set(rings[0]) & set(rings[1]), rings  # disjoint
        assert body["branches"][0]["content"] == body["branches"][1]["content"]

        # a batch spreads its requests over both peers' rings
        c = client(a)
        bid = c.batches.create(input_file_id=c.files.create(file=("in.jsonl", _batch_file(4, 4)), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h").id  # fmt: skip
        assert _wait_batch(c, bid).request_counts.completed == 4
        used = {r["ring"][0][0] for r in a.get("/v1/requests")["data"] if r.get("task") == bid}
        assert used == ids, used

        def rtt_in_records():
            peers = {p["peer_id"]: p for p in a.get("/v1/cluster")["peers"]}
            return b.peer_id in (peers[a.peer_id]["extra"].get("rtt") or {})

        wait_for(rtt_in_records, 30, interval=0.5, what="a's record to carry its RTT to b")
        view = a.get(f"/v1/p2pinfer/routing?model={MODEL}")
        inputs = {p["peer_id"]: p for p in view["peers"]}
        assert inputs[a.peer_id]["rtt_ms"] == 0.0 and inputs[b.peer_id]["rtt_ms"] is not None
        assert view["rings"]["latency"] == [[a.peer_id, 0, 30]]  # the entry itself: no hop at all
        shown = {p["peer_id"]: p for p in a.get("/v1/cluster")["routing"]["peers"]}  # each peer's inputs
        assert shown[b.peer_id]["rtt_ms"] is not None and shown[a.peer_id]["observed_tps"] > 0
    finally:
        b.stop()
