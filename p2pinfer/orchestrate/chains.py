"""Chains: steps that feed earlier steps' outputs into later prompts, run as a DAG.

Body: ``{"input": "...", "steps": [{"name": "summary", "model": ..., "messages": [...] | "prompt": ...,
<any chat/completions field>, "retries": 2}, ...], "output": "NAME", "p2pinfer": {"routing": ...}}``.

- A step's message contents (or prompt) may hold ``{{steps.NAME}}`` (that step's output text) and
  ``{{input}}`` (the chain's input). The steps a step refers to are its dependencies; a reference to
  a step that does not exist, to itself, a cycle, or any other ``{{...}}`` is a 400 before anything runs.
  Every step body is also parsed up front (model, sampling fields), with placeholders filled in.
- Steps run as soon as their dependencies are done, independent ones in parallel. A step whose
  request fails with a retryable status (429, 5xx) is tried again, up to ``retries`` times (default
  2, at most MAX_RETRIES), each try a new request on a fresh ring: elected without the peers of the
  rings that failed before when the cluster has room for that, as usual otherwise (within one try,
  the entry also replays on a member lost mid-answer). A step whose dependency failed is ``skipped``.
- The response carries every step's output, state, tries, ring and timing (start and end relative
  to the chain's start), and ``output``: the text of the ``output`` step (default: the last step).
- ``"stream": true``: SSE events ``{"type": "delta", "step", "content"}`` as steps generate,
  ``{"type": "retry", "step", "try", "error"}`` (the step's text so far is void), ``{"type": "step",
  ...}`` when a step ends, then ``{"type": "result", ...}`` (the response above) and ``[DONE]``.
"""

from __future__ import annotations

import re
import time
import uuid

import trio

from p2pinfer.api.openai import http_status
from p2pinfer.orchestrate.runner import RETRYABLE, Result, Runner
from p2pinfer.orchestrate.tasks import Task
from p2pinfer.serve.failures import Failure, FailureKind, bad_request

MAX_STEPS = 32
MAX_RETRIES = 5
DEFAULT_RETRIES = 2
RETRY_BACKOFF = 0.5  # s x try
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
STEP_REF = re.compile(r"^steps\.([A-Za-z_][A-Za-z0-9_-]*)$")
OWN_FIELDS = {"name", "retries", "stream", "stream_options"}


def _texts(step: dict) -> list[str]:
    """The template strings of a step: its message contents (string or text parts) or its prompt."""
    out = []
    if isinstance(step.get("messages"), list):
        for m in step["messages"]:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, list):
                out += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    if isinstance(step.get("prompt"), str):
        out.append(step["prompt"])
    return out


def references(step: dict, names: set[str]) -> list[str]:
    """The steps a step refers to, in order of first mention; BadRequest for anything unknown."""
    deps: list[str] = []
    for text in _texts(step):
        for ref in PLACEHOLDER.findall(text):
            if ref == "input":
                continue
            m = STEP_REF.match(ref)
            if m is None:
                raise bad_request(f"step {step['name']!r}: unknown placeholder {{{{{ref}}}}} "
                                 "(use {{steps.NAME}} or {{input}})", "steps")  # fmt: skip
            if m.group(1) not in names:
                raise bad_request(f"step {step['name']!r} refers to unknown step {m.group(1)!r}", "steps")
            if m.group(1) == step["name"]:
                raise bad_request(f"step {step['name']!r} refers to itself", "steps")
            if m.group(1) not in deps:
                deps.append(m.group(1))
    return deps


def fill(value, outputs: dict[str, str], chain_input: str):
    """`value` (a step body, recursively) with the message contents / prompt placeholders filled in."""

    def sub(text: str) -> str:
        def one(m: re.Match) -> str:
            ref = m.group(1)
            return chain_input if ref == "input" else outputs.get(ref[len("steps.") :], "")

        return PLACEHOLDER.sub(one, text)

    out = dict(value)
    if isinstance(out.get("prompt"), str):
        out["prompt"] = sub(out["prompt"])
    if isinstance(out.get("messages"), list):
        msgs = []
        for m in out["messages"]:
            if isinstance(m, dict):
                m = dict(m)
                c = m.get("content")
                if isinstance(c, str):
                    m["content"] = sub(c)
                elif isinstance(c, list):
                    m["content"] = [{**p, "text": sub(p["text"])} if isinstance(p, dict) and isinstance(
                        p.get("text"), str) else p for p in c]  # fmt: skip
            msgs.append(m)
        out["messages"] = msgs
    return out


def plan(body: dict) -> tuple[list[dict], dict[str, list[str]], str, str]:
    """Validate a chain: (steps, dependencies by name, output step, input); BadRequest on any mistake."""
    steps = body.get("steps")
    if not isinstance(steps, list) or not steps:
        raise bad_request("'steps' must be a non-empty list of step objects", "steps")
    if len(steps) > MAX_STEPS:
        raise bad_request(f"at most {MAX_STEPS} steps", "steps")
    chain_input = body.get("input", "")
    if not isinstance(chain_input, str):
        raise bad_request("'input' must be a string", "input")
    names: list[str] = []
    for s in steps:
        if not isinstance(s, dict):
            raise bad_request("each step must be an object", "steps")
        n = s.get("name")
        if not isinstance(n, str) or not NAME.match(n):
            raise bad_request(
                "each step needs a 'name' of letters, digits, _ or - (starting with a letter)", "steps"
            )
        if n in names:
            raise bad_request(f"two steps are named {n!r}", "steps")
        if ("messages" in s) == ("prompt" in s):
            raise bad_request(
                f"step {n!r} needs 'messages' (chat) or 'prompt' (completions), not both", "steps"
            )
        r = s.get("retries", DEFAULT_RETRIES)
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RETRIES:
            raise bad_request(f"step {n!r}: 'retries' must be an integer from 0 to {MAX_RETRIES}", "steps")
        names.append(n)
    deps = {s["name"]: references(s, set(names)) for s in steps}
    # a cycle: what Kahn's algorithm cannot order
    indeg = {n: len(d) for n, d in deps.items()}
    ready = [n for n in names if indeg[n] == 0]
    ordered = []
    while ready:
        n = ready.pop()
        ordered.append(n)
        for m, d in deps.items():
            if n in d:
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
    if len(ordered) != len(names):
        stuck = sorted(set(names) - set(ordered))
        raise bad_request(f"the steps form a cycle: {', '.join(stuck)}", "steps")
    output = body.get("output", names[-1])
    if output not in names:
        raise bad_request(f"'output' names no step: {output!r}", "output")
    return steps, deps, output, chain_input


def step_body(step: dict, chain_body: dict) -> dict:
    b = {k: v for k, v in step.items() if k not in OWN_FIELDS}
    if "p2pinfer" not in b and isinstance(chain_body.get("p2pinfer"), dict):
        b["p2pinfer"] = chain_body["p2pinfer"]
    return b


async def prepare(runner: Runner, body: dict):
    """Validate the chain and parse every step body (placeholders filled with stand-ins)."""
    steps, deps, output, chain_input = plan(body)
    stand_in = {s["name"]: "x" for s in steps}
    for s in steps:
        try:
            await runner.parse(fill(step_body(s, body), stand_in, chain_input or "x"), "messages" in s)
        except Failure as e:
            raise Failure(e.kind, f"step {s['name']!r}: {e}", param=e.param) from e
    return steps, deps, output, chain_input


async def run_chain(runner: Runner, task: Task, body: dict, steps: list[dict], deps: dict[str, list[str]],
                    output: str, chain_input: str, emit=None) -> dict:  # fmt: skip
    t0 = time.monotonic()
    done = {s["name"]: trio.Event() for s in steps}
    outputs: dict[str, str] = {}
    info: dict[str, dict] = {s["name"]: {"name": s["name"], "state": "waiting", "depends_on": deps[s["name"]],
                                         "tries": 0} for s in steps}  # fmt: skip

    async def run_step(step: dict) -> None:
        name = step["name"]
        me = info[name]
        try:
            for d in deps[name]:
                await done[d].wait()
            if any(info[d]["state"] != "done" for d in deps[name]):
                me["state"] = "skipped"
                return
            chat = "messages" in step
            retries = step.get("retries", DEFAULT_RETRIES)
            me["state"], me["started"] = "running", round(time.monotonic() - t0, 3)
            tracks: list = []
            avoid: frozenset[str] = frozenset()

            def tracked(t) -> None:
                task.parts[name] = t.id
                tracks.append(t)

            async def on_text(text: str) -> None:
                if emit is not None:
                    await emit({"type": "delta", "step": name, "content": text})

            for attempt in range(retries + 1):
                me["tries"] = attempt + 1
                try:
                    parsed = await runner.parse(fill(step_body(step, body), outputs, chain_input), chat)
                    res: Result = await runner.run(parsed, chat, task=task.id, part=name, on_track=tracked,
                                                   avoid=avoid, on_text=on_text)  # fmt: skip
                except Failure as e:
                    me["error"] = f"{http_status(e.kind)}: {e}"
                    # the next try: a ring without this one's peers, if one fits
                    if tracks and tracks[-1].ring:
                        avoid = avoid | {m[0] for m in tracks[-1].ring}
                    if e.kind in RETRYABLE and attempt < retries:
                        if emit is not None:  # what this try streamed is void
                            await emit(
                                {"type": "retry", "step": name, "try": attempt + 2, "error": me["error"]}
                            )
                        await trio.sleep(RETRY_BACKOFF * (attempt + 1))
                        continue
                    me["state"] = "cancelled" if e.kind is FailureKind.CANCELLED else "error"
                    return
                outputs[name] = res.text
                me.pop("error", None)
                me.update(state="done", model=res.model, content=res.text, finish_reason=res.finish,
                          usage=res.usage(), ring=res.ring, ttft=res.ttft, id=res.id)  # fmt: skip
                return
        finally:
            if "started" in me:
                me["ended"] = round(time.monotonic() - t0, 3)
                me["elapsed"] = round(me["ended"] - me["started"], 3)
            if me["state"] in ("waiting", "running"):
                me["state"] = "cancelled"
            done[name].set()
            if emit is not None and not task.scope.cancel_called:  # the whole chain cancelled: nobody listens
                await emit({"type": "step", "step": name, **me})

    with task.scope:
        async with trio.open_nursery() as nursery:
            for s in steps:
                nursery.start_soon(run_step, s)
    states = {i["state"] for i in info.values()}
    state = "cancelled" if task.state == "cancelled" else ("done" if states == {"done"} else "error")
    task.state = state
    return {"id": task.id, "object": "p2pinfer.chain", "created": int(task.created), "state": state,
            "output": outputs.get(output), "output_step": output, "steps": [info[s["name"]] for s in steps],
            "elapsed": round(time.monotonic() - t0, 3)}  # fmt: skip


def new_id() -> str:
    return f"chain-{uuid.uuid4().hex[:20]}"
