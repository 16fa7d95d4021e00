"""OpenAI's Batch API at any peer: files (purpose ``batch``) and batches, persisted under the data dir.

Layout under ``<data dir>/batches/``:

- ``files/<file id>.json`` (the file object) + ``files/<file id>.data`` (its bytes). Uploaded input
  files and the output / error files of finished batches alike.
- ``<batch id>.json``: the batch object, rewritten (atomically) as it changes.
- ``<batch id>.output.jsonl`` / ``<batch id>.errors.jsonl``: one result line per request, appended as
  each finishes. On start-up a peer resumes every batch it left validating, in progress or
  finalizing: the custom_ids already in these two files are not run again.

Each input line is ``{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body"}``; a file
whose lines are not all like that fails the batch at validation (OpenAI's ``errors`` list, with line
numbers). Requests run CONCURRENCY at a time (bounded by the peer's --max-requests), by default with
the ``least-loaded`` routing policy, so they spread over the rings of several peers; a request that
fails with 429 / 5xx is tried again (TRIES in all). Output lines are OpenAI's: ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}``; failed requests go to the error
file with their status and error body. Logprobs are not carried into batch output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import trio

from p2pinfer.api.openai import FAILURE_HTTP
from p2pinfer.orchestrate.runner import RETRYABLE, Runner
from p2pinfer.orchestrate.tasks import TaskRegistry
from p2pinfer.serve.failures import Failure, FailureKind, bad_request

log = logging.getLogger("p2pinfer.batches")

ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}  # endpoint -> chat
MAX_FILE_BYTES = 100 * 1024 * 1024
MAX_LINES = 50_000
TRIES = 3
RETRY_BACKOFF = 1.0
DEFAULT_ROUTING = "least-loaded"
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
ID = re.compile(r"^(file|batch)-[0-9a-f]{24}$")


class NotFound(Exception):
    pass


def _read_all(paths) -> list[dict]:
    """The JSON objects of these files; one that cannot be read (a disk problem, a hand edit) is skipped
    with a warning rather than taking the batch service down."""
    out = []
    for p in paths:
        try:
            obj = json.loads(p.read_text())
            if isinstance(obj, dict) and "id" in obj and "created_at" in obj:
                out.append(obj)
                continue
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable %s: %s", p, e)
            continue
        log.warning("skipping %s: not a file or batch object", p)
    return sorted(out, key=lambda o: o["created_at"], reverse=True)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)

    # --- files --------------------------------------------------------------------------------
    def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        fid = f"file-{uuid.uuid4().hex[:24]}"
        (self.files_dir / f"{fid}.data").write_bytes(data)
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}  # fmt: skip
        _write_json(self.files_dir / f"{fid}.json", obj)
        return obj

    def file(self, fid: str) -> dict:
        if not ID.match(fid) or not (self.files_dir / f"{fid}.json").is_file():
            raise NotFound(f"no file {fid!r}")
        return json.loads((self.files_dir / f"{fid}.json").read_text())

    def file_bytes(self, fid: str) -> bytes:
        self.file(fid)
        return (self.files_dir / f"{fid}.data").read_bytes()

    def files(self) -> list[dict]:
        return _read_all(self.files_dir.glob("file-*.json"))

    def delete_file(self, fid: str) -> None:
        self.file(fid)
        for suffix in (".json", ".data"):
            (self.files_dir / f"{fid}{suffix}").unlink(missing_ok=True)

    # --- batches ------------------------------------------------------------------------------
    def batch(self, bid: str) -> dict:
        if not ID.match(bid) or not (self.root / f"{bid}.json").is_file():
            raise NotFound(f"no batch {bid!r}")
        return json.loads((self.root / f"{bid}.json").read_text())

    def save(self, batch: dict) -> None:
        _write_json(self.root / f"{batch['id']}.json", batch)

    def batches(self) -> list[dict]:
        return _read_all(self.root.glob("batch-*.json"))

    def results_path(self, bid: str, kind: str) -> Path:
        return self.root / f"{bid}.{kind}.jsonl"

    def done_ids(self, bid: str) -> tuple[set[str], int, int]:
        """custom_ids with a result line already, and how many succeeded / failed. A line cut short by
        a crash is dropped from its file (so the next line appended starts clean) and runs again."""
        done, ok, failed = set(), 0, 0
        for kind in ("output", "errors"):
            p = self.results_path(bid, kind)
            if not p.exists():
                continue
            kept = []
            for line in p.read_text(errors="replace").splitlines():
                try:
                    cid = json.loads(line)["custom_id"]
                except (ValueError, KeyError, TypeError):
                    continue
                if cid in done:
                    continue
                done.add(cid)
                kept.append(line)
                if kind == "output":
                    ok += 1
                else:
                    failed += 1
            tmp = p.with_suffix(".tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, p)
        return done, ok, failed


def parse_input(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """(requests, validation errors in OpenAI's shape)."""
    errors, reqs, seen = [], [], set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [
            {"code": "invalid_json_line", "message": "the file is not UTF-8", "param": None, "line": None}
        ]
    lines = text.splitlines()
    if len([ln for ln in lines if ln.strip()]) > MAX_LINES:
        return [], [{"code": "too_many_lines", "message": f"more than {MAX_LINES} requests", "param": None,
                     "line": None}]  # fmt: skip
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue

        def err(code: str, msg: str, param: str | None = None, n=n) -> None:
            errors.append({"code": code, "message": msg, "param": param, "line": n})

        try:
            obj = json.loads(line)
        except ValueError:
            err("invalid_json_line", "this line is not valid JSON")
            continue
        if not isinstance(obj, dict):
            err("invalid_request", "each line must be a JSON object")
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            err("missing_required_parameter", "'custom_id' must be a non-empty string", "custom_id")
        elif cid in seen:
            err("duplicate_custom_id", f"custom_id {cid!r} appears twice", "custom_id")
        if obj.get("method", "POST") != "POST":
            err("invalid_method", "'method' must be POST", "method")
        if obj.get("url") != endpoint:
            err("invalid_url", f"'url' must be the batch's endpoint {endpoint}", "url")
        if not isinstance(obj.get("body"), dict):
            err("missing_required_parameter", "'body' must be an object", "body")
        if isinstance(cid, str):
            seen.add(cid)
        reqs.append(obj)
    if not reqs and not errors:
        errors.append(
            {"code": "empty_file", "message": "the file has no requests", "param": None, "line": None}
        )
    return reqs, errors


class BatchService:
    def __init__(self, store: BatchStore, runner: Runner, tasks: TaskRegistry, concurrency: int) -> None:
        self.store, self.runner, self.tasks = store, runner, tasks
        self.concurrency = max(1, concurrency)
        self.nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Host batch work for the agent's lifetime; resume what a previous run left unfinished."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for b in self.store.batches():
                if "status" not in b:
                    continue
                if b["status"] == "cancelling":
                    self._finish(b, "cancelled")
                elif b["status"] in UNFINISHED:
                    log.info("resuming batch %s (%s)", b["id"], b["status"])
                    self._start(b["id"])
            task_status.started()
            await trio.sleep_forever()

    def create(self, body: dict) -> dict:
        fid = body.get("input_file_id")
        if not isinstance(fid, str):
            raise bad_request("'input_file_id' must be a file id", "input_file_id")
        try:
            f = self.store.file(fid)
        except NotFound as e:
            raise bad_request(str(e), "input_file_id") from e
        if f["purpose"] != "batch":
            raise bad_request(f"file {fid} has purpose {f['purpose']!r}, not 'batch'", "input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
        window = body.get("completion_window", "24h")
        if window != "24h":
            raise bad_request("'completion_window' must be '24h'", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):  # fmt: skip
            raise bad_request("'metadata' must be an object of at most 16 string values", "metadata")
        if self.nursery is None:
            raise Failure(FailureKind.UNAVAILABLE, "batches are not running on this peer yet")
        now = int(time.time())
        batch = {"id": f"batch-{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": fid, "completion_window": window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata}  # fmt: skip
        self.store.save(batch)
        self._start(batch["id"])
        return batch

    def cancel(self, bid: str) -> dict:
        batch = self.store.batch(bid)
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            self.store.save(batch)
            task = self.tasks.get(bid)
            if task is not None:
                task.scope.cancel()
            else:
                self._finish(batch, "cancelled")
        return self.store.batch(bid)

    def _start(self, bid: str) -> None:
        task = self.tasks.new("batch", bid)
        assert self.nursery is not None
        self.nursery.start_soon(self._run_guarded, bid, task)

    async def _run_guarded(self, bid: str, task) -> None:
        try:
            with task.scope:
                await self._run(bid, task)
        except Exception:
            log.exception("batch %s failed", bid)
            batch = self.store.batch(bid)
            batch["errors"] = {"object": "list", "data": [{"code": "server_error", "message": "internal error",
                                                           "param": None, "line": None}]}  # fmt: skip
            self._finish(batch, "failed")
            task.state = "error"
            return
        batch = self.store.batch(bid)
        if batch["status"] == "cancelling" or task.scope.cancelled_caught:
            self._finish(batch, "cancelled")
            task.state = "cancelled"
        else:
            task.state = "done" if batch["status"] == "completed" else "error"

    async def _run(self, bid: str, task) -> None:
        batch = self.store.batch(bid)
        data = self.store.file_bytes(batch["input_file_id"])
        reqs, errors = parse_input(data, batch["endpoint"])
        if errors:
            batch["errors"] = {"object": "list", "data": errors[:100]}
            self._finish(batch, "failed")
            return
        chat = ENDPOINTS[batch["endpoint"]]
        done, ok, failed = self.store.done_ids(bid)
        counts = {"total": len(reqs), "completed": ok, "failed": failed}
        if batch["status"] == "validating":
            batch["in_progress_at"] = int(time.time())
        batch.update(status="in_progress", request_counts=counts)
        self.store.save(batch)
        task.detail = {"request_counts": counts}
        slots = trio.Semaphore(self.concurrency)  # taken before a request's task starts: no task per line

        async def one(req: dict) -> None:
            try:
                line, kind = await self._one(req, chat, task)
            finally:
                slots.release()
            with open(self.store.results_path(bid, kind), "a") as f:
                f.write(json.dumps(line) + "\n")
            counts["completed" if kind == "output" else "failed"] += 1
            b = self.store.batch(bid)
            b["request_counts"] = counts
            self.store.save(b)

        async with trio.open_nursery() as nursery:
            for req in reqs:
                if req["custom_id"] not in done:
                    await slots.acquire()
                    nursery.start_soon(one, req)
        batch = self.store.batch(bid)
        if batch["status"] == "cancelling":
            return
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        self.store.save(batch)
        self._finish(batch, "completed")

    async def _one(self, req: dict, chat: bool, task) -> tuple[dict, str]:
        """(result line, "output" | "errors") for one request."""
        cid = req["custom_id"]
        body = dict(req["body"])
        ext = body.get("p2pinfer")
        if ext is None or (isinstance(ext, dict) and "routing" not in ext):
            body["p2pinfer"] = {**(ext or {}), "routing": DEFAULT_ROUTING}
        line_id = f"batch_req_{uuid.uuid4().hex[:24]}"
        status, err_body = 500, None
        tracks: list = []
        avoid: frozenset[str] = frozenset()

        def tracked(t) -> None:
            task.parts[cid] = t.id
            tracks.append(t)

        for attempt in range(TRIES):
            await self._unless_draining()
            try:
                parsed = await self.runner.parse(body, chat)
                res = await self.runner.run(
                    parsed, chat, task=task.id, part=cid, on_track=tracked, avoid=avoid
                )
                return {"id": line_id, "custom_id": cid, "response": {"status_code": 200, "request_id": res.id,
                        "body": res.openai_body()}, "error": None}, "output"  # fmt: skip
            except Failure as e:
                status, kind, code = FAILURE_HTTP[e.kind]
                err_body = {"message": str(e), "type": kind, "param": e.param, "code": code}
                if e.kind not in RETRYABLE or attempt == TRIES - 1:
                    break
                await self._unless_draining()
                if tracks and tracks[-1].ring:  # try a ring without the failed one's peers, if one fits
                    avoid = avoid | {m[0] for m in tracks[-1].ring}
                await trio.sleep(max(e.retry_after or 0, RETRY_BACKOFF * (attempt + 1)))
        return {"id": line_id, "custom_id": cid, "response": {"status_code": status, "request_id": None,
                "body": {"error": err_body}}, "error": None}, "errors"  # fmt: skip

    async def _unless_draining(self) -> None:
        """A peer shutting down (SIGTERM) takes no new requests: a batch line waits rather than failing,
        and runs again when this peer restarts and resumes the batch."""
        if getattr(self.runner.entry, "draining", False):
            await trio.sleep_forever()

    def _finish(self, batch: dict, status: str) -> None:
        now = int(time.time())
        bid = batch["id"]
        for kind, key, purpose in (("output", "output_file_id", "batch_output"), ("errors", "error_file_id",
                                                                                    "batch_output")):  # fmt: skip
            p = self.store.results_path(bid, kind)
            if batch.get(key) is None and p.exists() and p.stat().st_size:
                batch[key] = self.store.add_file(p.read_bytes(), f"{bid}_{kind}.jsonl", purpose)["id"]
        stamp = {"completed": "completed_at", "failed": "failed_at", "cancelled": "cancelled_at"}[status]
        batch.update(status=status, **{stamp: now})
        self.store.save(batch)
