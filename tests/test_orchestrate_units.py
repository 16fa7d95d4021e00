"""Orchestration logic without agents: vote, chain planning and templates, chain retries and skips,
batch input validation, batch resume and cancel -- with a fake runner in place of rings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import trio

from p2pinfer.orchestrate import batches, chains
from p2pinfer.orchestrate.fanout import branch_bodies, normalise, vote
from p2pinfer.orchestrate.runner import Result
from p2pinfer.orchestrate.tasks import TaskRegistry
from p2pinfer.serve.failures import Failure, FailureKind, bad_request


def res(text: str, lps=(), model="m") -> Result:
    return Result("id", model, True, text, "stop", 1, max(1, len(lps)), list(lps))


# --- fan-out ------------------------------------------------------------------------------------


def test_normalise():
    assert normalise("  Paris.\n") == normalise("paris") == normalise("PARIS!") == "paris"
    assert normalise("The  capital\tis Paris") == "the capital is paris"


def test_vote_majority_then_mean_logprob_then_branch():
    win, tally = vote({0: res("Lyon", [-0.1]), 1: res("Paris.", [-2.0]), 2: res("paris", [-3.0])})
    assert win == 1 and tally["tally"][0]["votes"] == 2 and tally["tally"][0]["branches"] == [1, 2]
    win, _ = vote({0: res("Lyon", [-1.0]), 1: res("Paris", [-0.5])})  # a tie: the surer answer
    assert win == 1
    win, _ = vote({0: res("Lyon", [-0.5]), 1: res("Paris", [-0.5])})  # a full tie: the lower branch
    assert win == 0


def test_branch_bodies():
    bodies = branch_bodies({"prompt": "x", "temperature": 0.5, "models": ["a", "b"], "aggregate": "vote"})
    assert [b["model"] for b in bodies] == ["a", "b"] and all(b["temperature"] == 0.5 for b in bodies)
    assert all(b["p2pinfer"] == {"routing": "least-loaded"} for b in bodies) and "aggregate" not in bodies[0]
    assert branch_bodies({"prompt": "x", "seeds": [1], "p2pinfer": {"routing": "latency"}})[0][
        "p2pinfer"
    ] == {"routing": "latency"}
    for bad in ({"prompt": "x"}, {"branches": [1]}, {"branches": [{"aggregate": "all"}]}, {"seeds": 3}):
        with pytest.raises(Failure):
            branch_bodies(bad)


# --- chains -------------------------------------------------------------------------------------


def step(name, text, **kw):
    return {"name": name, "prompt": text, **kw}


def test_plan_dependencies_and_errors():
    steps, deps, output, _ = chains.plan({"steps": [step("a", "x"), step("b", "{{ steps.a }} {{input}}"),
                                                    step("c", "{{steps.b}}{{steps.a}}")]})  # fmt: skip
    assert deps == {"a": [], "b": ["a"], "c": ["b", "a"]} and output == "c"
    messages = {
        "name": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "{{steps.a}}"}]}],
    }
    assert chains.plan({"steps": [step("a", "x"), messages]})[1]["m"] == ["a"]
    for bad, msg in [
        ({"steps": [step("a", "{{steps.b}}"), step("b", "{{steps.a}}")]}, "cycle"),
        ({"steps": [step("a", "{{steps.a}}")]}, "itself"),
        ({"steps": [step("a", "{{steps.z}}")]}, "unknown step"),
        ({"steps": [step("a", "{{x}}")]}, "placeholder"),
        ({"steps": [step("a", "x"), step("a", "y")]}, "two steps"),
        ({"steps": [step("1a", "x")]}, "name"),
        ({"steps": [{"name": "a"}]}, "messages"),
        ({"steps": [step("a", "x")], "output": "b"}, "output"),
        ({"steps": [step("a", "x", retries=-1)]}, "retries"),
        ({"steps": [step("a", "x")], "input": 3}, "input"),
    ]:
        with pytest.raises(Failure, match=msg):
            chains.plan(bad)


def test_fill():
    body = {"prompt": "A {{steps.a}} B {{input}}", "messages": [{"role": "user", "content": "{{ steps.a }}"}]}
    out = chains.fill(body, {"a": "{{input}}"}, "IN")
    assert out["prompt"] == "A {{input}} B IN"  # an output is not itself a template
    assert out["messages"][0]["content"] == "{{input}}" and body["prompt"].startswith("A {{")


class FakeRunner:
    """parse() hands the body through; run() answers from `script` (name -> list of outcomes)."""

    def __init__(self, script=None, delay=0.0):
        self.script = script or {}
        self.delay = delay
        self.prompts: list[str] = []
        self.avoided: list[tuple[str, frozenset]] = []
        self.calls = 0
        self.entry = SimpleNamespace(draining=False)

    async def parse(self, body, chat):
        if body.get("max_tokens", 1) < 0:
            raise bad_request("'max_tokens' must be between 1 and 1e9", "max_tokens")
        return body

    async def run(
        self, parsed, chat, *, task="", part="", on_track=None, avoid=frozenset(), on_text=None, **kw
    ):
        self.calls += 1
        self.avoided.append((part, avoid))
        if on_track is not None:
            on_track(SimpleNamespace(id=f"r{self.calls}", ring=[[f"peer{self.calls}", 0, 30]]))
        text = parsed.get("prompt") or parsed["messages"][-1]["content"]
        self.prompts.append(text)
        await trio.sleep(self.delay)
        if on_text is not None:
            await on_text(text.upper())
        outcomes = self.script.get(part)
        if outcomes:
            o = outcomes.pop(0)
            if isinstance(o, Exception):
                raise o
        return Result(f"r-{part}", parsed.get("model", "m"), chat, text.upper(), "stop", 1, 1)


def _chain(body, runner, emit=None):
    steps, deps, output, chain_input = chains.plan(body)
    task = TaskRegistry().new("chain")

    async def main():
        return await chains.run_chain(runner, task, body, steps, deps, output, chain_input, emit)

    return trio.run(main)


def test_chain_retries_a_failed_step_and_feeds_outputs(monkeypatch):
    monkeypatch.setattr(chains, "RETRY_BACKOFF", 0.0)
    runner = FakeRunner({"a": [Failure(FailureKind.UNAVAILABLE, "no ring fits")]}, delay=0.05)
    out = _chain({"input": "in", "steps": [step("a", "x {{input}}"), step("b", "y"),
                                           step("c", "{{steps.a}}+{{steps.b}}")]}, runner)  # fmt: skip
    s = {x["name"]: x for x in out["steps"]}
    assert out["state"] == "done" and s["a"]["tries"] == 2 and s["b"]["tries"] == 1
    assert out["output"] == "X IN+Y"
    assert s["c"]["started"] >= max(s["a"]["ended"], s["b"]["ended"])
    assert s["b"]["started"] < s["a"]["ended"]  # independent steps overlap
    tries = [avoid for part, avoid in runner.avoided if part == "a"]
    assert (
        len(tries) == 2 and tries[0] == frozenset() and len(tries[1]) == 1
    )  # the retry avoids the failed ring


def test_chain_gives_up_and_skips_dependents(monkeypatch):
    monkeypatch.setattr(chains, "RETRY_BACKOFF", 0.0)
    runner = FakeRunner({"a": [Failure(FailureKind.UNAVAILABLE, "x")] * 3, "b": [Failure(FailureKind.BAD_REQUEST, "bad")]})
    out = _chain({"steps": [step("a", "x", retries=2), step("b", "y"), step("c", "{{steps.a}}"),
                            step("d", "z")]}, runner)  # fmt: skip
    s = {x["name"]: x for x in out["steps"]}
    assert out["state"] == "error" and out["output"] == "Z"
    assert s["a"]["state"] == "error" and s["a"]["tries"] == 3 and s["a"]["error"].startswith("503")
    assert s["b"]["state"] == "error" and s["b"]["tries"] == 1  # 400 is not retried
    assert s["c"]["state"] == "skipped" and s["d"]["state"] == "done"


# --- batches ------------------------------------------------------------------------------------


def line(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"prompt": cid, **body}})


def test_parse_input_reports_lines():
    data = "\n".join(
        [line("a"), "not json", line("a"), line("b", url="/v1/chat/completions"), "[1]", ""]
    ).encode()
    reqs, errors = batches.parse_input(data, "/v1/completions")
    assert [(e["line"], e["code"]) for e in errors] == [(2, "invalid_json_line"), (3, "duplicate_custom_id"),
                                                         (4, "invalid_url"), (5, "invalid_request")]  # fmt: skip
    assert batches.parse_input(b"", "/v1/completions")[1][0]["code"] == "empty_file"
    assert batches.parse_input(b"\xff", "/v1/completions")[1][0]["code"] == "invalid_json_line"
    assert len(batches.parse_input(line("a").encode(), "/v1/completions")[0]) == 1


def _service(tmp_path, runner, concurrency=2):
    store = batches.BatchStore(tmp_path / "batches")
    return store, batches.BatchService(store, runner, TaskRegistry(), concurrency)


def test_batch_resumes_only_what_is_missing_and_bounds_concurrency(tmp_path):
    runner = FakeRunner(delay=0.02)
    store, service = _service(tmp_path, runner)
    f = store.add_file("\n".join(line(f"q{i}") for i in range(5)).encode(), "in.jsonl", "batch")
    # a batch a previous run left in progress, with q0 and q3 done
    batch = {"id": "batch-" + "0" * 24, "object": "batch", "endpoint": "/v1/completions", "errors": None,
             "input_file_id": f["id"], "status": "in_progress", "output_file_id": None, "error_file_id": None,
             "created_at": 1, "in_progress_at": 1, "request_counts": {"total": 5, "completed": 2, "failed": 0}}  # fmt: skip
    store.save(batch)
    (store.root / ("batch-" + "1" * 24 + ".json")).write_text("{cut short")  # skipped with a warning
    with open(store.results_path(batch["id"], "output"), "w") as out:
        for cid in ("q0", "q3"):
            out.write(json.dumps({"custom_id": cid, "response": {"status_code": 200}}) + "\n")
        out.write('{"custom_id": "q4", "resp')  # cut short by the crash: q4 runs again
    running, peak = 0, 0
    real_run = runner.run

    async def counting(*a, **kw):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await real_run(*a, **kw)
        finally:
            running -= 1

    runner.run = counting

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            with trio.fail_after(10):
                while store.batch(batch["id"])["status"] != "completed":
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sorted(runner.prompts) == ["q1", "q2", "q4"] and peak <= 2
    b = store.batch(batch["id"])
    assert b["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    text = store.file_bytes(b["output_file_id"]).decode()
    assert sorted(json.loads(x)["custom_id"] for x in text.splitlines() if x.endswith("}")) == [
        f"q{i}" for i in range(5)
    ]


def test_batch_create_cancel_and_errors(tmp_path):
    runner = FakeRunner({"q1": [Failure(FailureKind.UNAVAILABLE, "busy"), Failure(FailureKind.UNAVAILABLE, "busy")]}, delay=0.01)
    store, service = _service(tmp_path, runner)
    monkey = batches.RETRY_BACKOFF
    batches.RETRY_BACKOFF = 0.0
    try:
        f = store.add_file(
            "\n".join([line("q0"), line("q1"), line("bad", max_tokens=-1)]).encode(), "a", "batch"
        )
        slow = store.add_file("\n".join(line(f"s{i}") for i in range(50)).encode(), "b", "batch")
        for bad in ({"input_file_id": "file-nope", "endpoint": "/v1/completions"},
                    {"input_file_id": f["id"], "endpoint": "/v1/embeddings"},
                    {"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "1h"},
                    {"input_file_id": f["id"], "endpoint": "/v1/completions", "metadata": {"a": 1}}):  # fmt: skip
            with pytest.raises(Failure):
                service.create(bad)

        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                done = service.create({"input_file_id": f["id"], "endpoint": "/v1/completions"})
                runner.delay = 0.2
                cancelled = service.create({"input_file_id": slow["id"], "endpoint": "/v1/completions"})
                await trio.sleep(0.3)
                assert service.cancel(cancelled["id"])["status"] == "cancelling"
                with trio.fail_after(10):
                    while {store.batch(x["id"])["status"] for x in (done, cancelled)} != {
                        "completed",
                        "cancelled",
                    }:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
                return done["id"], cancelled["id"]

        done, cancelled = trio.run(main)
    finally:
        batches.RETRY_BACKOFF = monkey
    b = store.batch(done)
    assert b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}  # q1 succeeded on its third try
    err = json.loads(store.file_bytes(b["error_file_id"]))
    assert err["custom_id"] == "bad" and err["response"]["status_code"] == 400
    c = store.batch(cancelled)
    assert c["cancelled_at"] and c["request_counts"]["completed"] < 50


def test_a_retry_avoids_the_failed_ring_through_the_entry():
    """AVOID set around a request reaches the entry's election in the request's own tasks."""
    from p2pinfer.cluster.record import PeerRecord
    from p2pinfer.cluster.routing import RouteInputs
    from p2pinfer.engine import ModelCatalog
    from p2pinfer.orchestrate.runner import AVOID
    from p2pinfer.serve.entry import EntryService

    catalog = ModelCatalog()
    name = catalog.list()[0].name
    records = [PeerRecord(p, 1, memory_free=8 << 30, compute=1.0, models=(name,)) for p in ("pa", "pb")]
    entry = EntryService("pa", None, lambda: records, 8)
    entry.routing_inputs = lambda: RouteInputs("pa", avoid=AVOID.get())
    model = catalog.get(name)
    seen = []

    async def elect():
        seen.append(entry.elect(model)[0].peer_id)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(elect)
        token = AVOID.set(frozenset({"pa"}))
        try:
            async with trio.open_nursery() as n:
                n.start_soon(elect)
        finally:
            AVOID.reset(token)
        token = AVOID.set(frozenset({"pa", "pb"}))  # nothing fits without them: as if none were avoided
        try:
            await elect()
        finally:
            AVOID.reset(token)

    trio.run(main)
    assert seen == ["pa", "pb", "pa"]


def test_chain_streams_deltas_retries_and_steps(monkeypatch):
    monkeypatch.setattr(chains, "RETRY_BACKOFF", 0.0)
    events = []

    async def emit(e):
        events.append(e)

    out = _chain({"steps": [step("a", "x"), step("b", "{{steps.a}}!")]},
                 FakeRunner({"a": [Failure(FailureKind.TIMEOUT, "stalled")]}), emit)  # fmt: skip
    assert out["output"] == "X!"
    kinds = [(e["type"], e["step"]) for e in events]
    assert kinds == [
        ("delta", "a"),
        ("retry", "a"),
        ("delta", "a"),
        ("step", "a"),
        ("delta", "b"),
        ("step", "b"),
    ]
    assert events[1]["try"] == 2 and events[3]["state"] == "done" and events[4]["content"] == "X!"


def test_batch_lines_wait_while_the_peer_drains(tmp_path):
    """SIGTERM: the entry answers 503 to new requests; batch lines must not fail for that."""
    runner = FakeRunner({"q1": [Failure(FailureKind.UNAVAILABLE, "this peer is shutting down")]})
    store, service = _service(tmp_path, runner, concurrency=1)
    f = store.add_file("\n".join(line(f"q{i}") for i in range(3)).encode(), "in.jsonl", "batch")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            real = runner.run

            async def draining_after_q0(parsed, chat, **kw):
                if kw.get("part") == "q1":
                    runner.entry.draining = True
                return await real(parsed, chat, **kw)

            runner.run = draining_after_q0
            b = service.create({"input_file_id": f["id"], "endpoint": "/v1/completions"})
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
            return b["id"]

    bid = trio.run(main)
    b = store.batch(bid)
    assert b["status"] == "in_progress" and b["request_counts"] == {"total": 3, "completed": 1, "failed": 0}


def test_measurements_credit_rings_and_round_for_records():
    from p2pinfer.orchestrate.measure import Measurements

    m = Measurements("me")
    done = SimpleNamespace(id="r1", state="done", ring=[["me", 0, 10], ["p2", 10, 30]],
                           to_dict=lambda: {"tokens_per_second": 20.0})  # fmt: skip
    failed = SimpleNamespace(
        id="r2", state="error", ring=[["p3", 0, 30]], to_dict=lambda: {"tokens_per_second": 9}
    )
    m.observe_requests([done, failed])
    m.observe_requests([done])  # counted once
    assert m.tps == {"me": 20.0, "p2": 20.0}
    m.observe_rtt("p2", 0.04)
    m.observe_rtt("p3", 12.34)
    assert m.published() == {"rtt": {"p2": 0.1, "p3": 12.0}, "tps": {"me": 20.0, "p2": 20.0}}
    inputs = m.inputs([], {"p2": 1}, frozenset({"p3"}))
    assert inputs.rtt_ms("me", "p3") == 12.34 and inputs.pending == {"p2": 1} and inputs.avoid == {"p3"}


def test_fanout_retries_busy_branches_and_reports_errors():
    from p2pinfer.orchestrate.fanout import run_fanout

    busy = Failure(FailureKind.BUSY, "busy", retry_after=0.01)
    runner = FakeRunner({"branch0": [busy, busy], "branch1": [Failure(FailureKind.UNAVAILABLE, "no ring")],
                         "branch2": [busy, busy, busy]})  # fmt: skip
    bodies = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}, {"prompt": "a"}]
    task = TaskRegistry().new("fanout")
    out = trio.run(run_fanout, runner, task, "vote", False, bodies, bodies)
    states = [b["state"] for b in out["branches"]]
    assert states == ["done", "error", "error", "done"] and out["state"] == "done"
    assert out["branches"][1]["error"].startswith("503") and out["branches"][2]["error"].startswith("429")
    assert [p for p, _ in runner.avoided].count("branch0") == 3 and out["result"]["content"] == "A"
