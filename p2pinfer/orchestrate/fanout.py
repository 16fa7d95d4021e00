"""Fan-out: one prompt to several branches (models, seeds, temperatures) at once, and what to make of
their answers.

A request body is a chat (``messages``) or completions (``prompt``) body plus:

- ``branches``: a list of objects, each overriding fields of the body for one branch (``model``,
  ``temperature``, ``seed``, ``max_tokens``, ...); or the shorthands ``models``, ``seeds`` or
  ``temperatures`` (a list each: one branch per value). At most MAX_BRANCHES.
- ``aggregate``: ``all`` (every answer, the default), ``first`` (the first branch to finish wins, the
  others are cancelled), ``vote`` (the answer most branches give after normalising -- case, surrounding
  whitespace and punctuation, inner whitespace runs -- ties broken by the highest mean token logprob).
- ``stream``: SSE events, each tagged with its branch: ``{"type": "delta", "branch": i, "content"}``,
  ``{"type": "branch", "branch": i, ...}`` when a branch ends, then one ``{"type": "result", ...}``
  and ``[DONE]``.

Branches elect their rings one after another (runner.py's election gate) and default to the
``least-loaded`` routing policy, which counts the rings this entry already has on each peer: so
branches spread over disjoint rings while the cluster has room, and share peers when it has not.
"""

from __future__ import annotations

import re
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable

import trio

from p2pinfer.api.openai import http_status
from p2pinfer.orchestrate.runner import Result, Runner
from p2pinfer.orchestrate.tasks import Task
from p2pinfer.serve.failures import Failure, FailureKind, bad_request

MAX_BRANCHES = 8
AGGREGATES = ("all", "first", "vote")
SHORTHANDS = {"models": "model", "seeds": "seed", "temperatures": "temperature"}
OWN_FIELDS = {"branches", "aggregate", "stream", "stream_options", *SHORTHANDS}
DEFAULT_ROUTING = "least-loaded"
BUSY_TRIES = 3  # a branch refused with 429 (this peer at --max-requests) starts again up to this often

Emit = Callable[[dict], Awaitable[None]]


def normalise(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"\s+", " ", t).strip()
    return t.strip(" .,;:!?\"'`()[]{}*_-")


def branch_bodies(body: dict) -> list[dict]:
    """The body of each branch: the common fields, then the branch's own."""
    common = {k: v for k, v in body.items() if k not in OWN_FIELDS}
    branches = body.get("branches")
    given = [k for k in SHORTHANDS if k in body]
    if branches is not None and given or len(given) > 1:
        raise bad_request("give one of 'branches', 'models', 'seeds' or 'temperatures'", "branches")
    if branches is None and given:
        values = body[given[0]]
        if not isinstance(values, list):
            raise bad_request(f"'{given[0]}' must be a list", given[0])
        branches = [{SHORTHANDS[given[0]]: v} for v in values]
    if not isinstance(branches, list) or not branches:
        raise bad_request("'branches' must be a non-empty list of objects", "branches")
    if len(branches) > MAX_BRANCHES:
        raise bad_request(f"at most {MAX_BRANCHES} branches", "branches")
    out = []
    for b in branches:
        if not isinstance(b, dict):
            raise bad_request("each branch must be an object of body fields", "branches")
        if set(b) & OWN_FIELDS:
            raise bad_request(f"a branch may not set {sorted(set(b) & OWN_FIELDS)}", "branches")
        merged = {**common, **b}
        ext = merged.get("p2pinfer")
        if ext is None or (isinstance(ext, dict) and "routing" not in ext):
            merged["p2pinfer"] = {**(ext or {}), "routing": DEFAULT_ROUTING}
        out.append(merged)
    return out


def vote(results: dict[int, Result]) -> tuple[int, dict]:
    """The winning branch and the tally: most votes, then the highest mean logprob, then lowest branch."""
    groups: dict[str, list[int]] = {}
    for i in sorted(results):
        groups.setdefault(normalise(results[i].text), []).append(i)

    def mean_lp(members: list[int]) -> float:
        lps = [results[i].mean_logprob for i in members if results[i].mean_logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")

    best = max(groups, key=lambda a: (len(groups[a]), mean_lp(groups[a]), -groups[a][0]))
    tally = [{"answer": a, "branches": m, "votes": len(m), "mean_logprob": _round(mean_lp(m))}
             for a, m in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))]  # fmt: skip
    return groups[best][0], {"tally": tally}


def _round(x: float | None) -> float | None:
    return None if x is None or x == float("-inf") else round(x, 4)


def branch_dict(i: int, body: dict, res: Result | None, state: str, error: str | None) -> dict:
    params = {k: body[k] for k in ("model", "temperature", "seed", "top_p", "max_tokens") if k in body}
    d = {"branch": i, "state": state, "params": params}
    if res is not None:
        d.update(id=res.id, model=res.model, content=res.text, finish_reason=res.finish, usage=res.usage(),
                 mean_logprob=_round(res.mean_logprob), ring=res.ring, ttft=res.ttft, elapsed=res.elapsed)  # fmt: skip
    if error is not None:
        d["error"] = error
    return d


async def prepare(runner: Runner, body: dict) -> tuple[str, bool, list[dict], list]:
    """Validate everything before any ring starts: (aggregate, chat, branch bodies, parsed bodies)."""
    aggregate = body.get("aggregate", "all")
    if aggregate not in AGGREGATES:
        raise bad_request(f"'aggregate' must be one of {', '.join(AGGREGATES)}", "aggregate")
    chat = "messages" in body
    if not chat and "prompt" not in body:
        raise bad_request("give 'messages' (chat) or 'prompt' (completions)", "messages")
    bodies = branch_bodies(body)
    if len(bodies) > runner.entry.max_requests:
        raise bad_request(f"{len(bodies)} branches exceed this peer's --max-requests {runner.entry.max_requests}",
                         "branches")  # fmt: skip
    parsed = [await runner.parse(b, chat) for b in bodies]
    return aggregate, chat, bodies, parsed


async def run_fanout(runner: Runner, task: Task, aggregate: str, chat: bool, bodies: list[dict], parsed: list,
                     emit: Emit | None = None) -> dict:  # fmt: skip
    """Run every branch under the task's cancel scope; the aggregated response body."""
    started = time.monotonic()
    results: dict[int, Result] = {}
    errors: dict[int, str] = {}
    dropped: set[int] = set()  # branches cancelled one by one (DELETE /v1/requests/{id})
    finished_order: list[int] = []

    async def branch(i: int, nursery: trio.Nursery) -> None:
        def tracked(track) -> None:
            task.parts[f"branch{i}"] = track.id

        async def on_text(text: str) -> None:
            if emit is not None:
                await emit({"type": "delta", "branch": i, "content": text})

        res: Result | None = None
        error: Failure | None = None
        for attempt in range(BUSY_TRIES):
            try:
                res = await runner.run(parsed[i], chat, task=task.id, part=f"branch{i}", on_text=on_text,
                                       want_logprobs=aggregate == "vote", on_track=tracked)  # fmt: skip
                break
            except Failure as e:
                error = e
                if e.kind is not FailureKind.BUSY or attempt == BUSY_TRIES - 1:
                    break
                await trio.sleep(e.retry_after or 1.0)  # this peer is at --max-requests: wait a bit
        if res is None:
            errors[i] = f"{http_status(error.kind)}: {error}"
            if error.kind is FailureKind.CANCELLED:
                dropped.add(i)
            state = "cancelled" if i in dropped else "error"
            if emit is not None:
                await emit({"type": "branch", **branch_dict(i, bodies[i], None, state, errors[i])})
            return
        results[i] = res
        finished_order.append(i)
        if emit is not None:
            await emit({"type": "branch", **branch_dict(i, bodies[i], res, "done", None)})
        if aggregate == "first":
            nursery.cancel_scope.cancel()

    with task.scope:
        async with trio.open_nursery() as nursery:
            for i in range(len(parsed)):
                nursery.start_soon(branch, i, nursery)
    cancelled = task.scope.cancelled_caught and task.state == "cancelled"
    out_branches = []
    for i in range(len(parsed)):
        if i in results:
            out_branches.append(branch_dict(i, bodies[i], results[i], "done", None))
        elif i in errors:
            out_branches.append(
                branch_dict(i, bodies[i], None, "cancelled" if i in dropped else "error", errors[i])
            )
        else:
            out_branches.append(branch_dict(i, bodies[i], None, "cancelled", None))
    body = {"id": task.id, "object": "p2pinfer.fanout", "created": int(task.created), "aggregate": aggregate,
            "branches": out_branches, "result": None, "elapsed": round(time.monotonic() - started, 3)}  # fmt: skip
    if cancelled:
        body["state"] = "cancelled"
    elif not results:
        body["state"] = "error"
    else:
        body["state"] = "done"
        if aggregate == "first":
            win = finished_order[0]
            body["result"] = {"branch": win, "content": results[win].text}
        elif aggregate == "vote":
            win, tally = vote(results)
            body["result"] = {"branch": win, "content": results[win].text, **tally}
    task.state = body["state"]
    return body


def new_id() -> str:
    return f"fanout-{uuid.uuid4().hex[:20]}"
