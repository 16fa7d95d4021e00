"""Tasks: the orchestrations entered at this peer (fan-outs, chains, batches), each with its parts,
listed and cancellable as a whole. A task owns a trio CancelScope around all of its work; cancelling
it cancels every part's ring at once."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

KEEP_FINISHED = 50


@dataclass
class Task:
    id: str
    kind: str  # "fanout", "chain", "batch"
    state: str = "running"  # running, done, error, cancelled
    created: float = field(default_factory=time.time)
    parts: dict[str, str] = field(default_factory=dict)  # part name -> request id of its latest try
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "p2pinfer.task", "kind": self.kind, "state": self.state,
                "created": int(self.created), "parts": dict(self.parts), **self.detail}  # fmt: skip


class TaskRegistry:
    def __init__(self) -> None:
        self.tasks: OrderedDict[str, Task] = OrderedDict()

    def new(self, kind: str, task_id: str | None = None) -> Task:
        t = Task(task_id or f"task-{uuid.uuid4().hex[:20]}", kind)
        self.tasks[t.id] = t
        finished = [k for k, v in self.tasks.items() if v.state != "running"]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.tasks[k]
        return t

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def cancel(self, task_id: str) -> Task | None:
        t = self.tasks.get(task_id)
        if t is not None and t.state == "running":
            t.scope.cancel()
            t.state = "cancelled"
        return t

    def list(self) -> list[dict]:
        return [t.to_dict() for t in reversed(self.tasks.values())]
