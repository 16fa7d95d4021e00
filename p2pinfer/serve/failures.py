"""Why a request could not be served, as a small domain enum: serve/ knows no HTTP.

api/ maps each kind to a status and OpenAI's error type in one table (api/openai.py); members
send the kind's value on the ring wire (`{"t": "error", "kind": ...}`), so the wire carries no
HTTP either.
"""

from __future__ import annotations

from enum import Enum


class FailureKind(Enum):
    BAD_REQUEST = "bad_request"  # the client's request is wrong (a field, a prompt, sampling values)
    CONTEXT_EXCEEDED = "context_exceeded"  # prompt + max_tokens do not fit the model's context
    UNKNOWN_MODEL = "unknown_model"
    NOT_FOUND = "not_found"  # no such request (GET/DELETE /v1/requests/{id})
    CONFLICT = "conflict"  # the request already ended; a duplicate id; a model that differs between peers
    CANCELLED = "cancelled"  # cancelled by its id while running
    BUSY = "busy"  # this peer (or a member) is at its request or session limit: retry soon
    UNAVAILABLE = "unavailable"  # no ring fits now, this peer is draining, or rings kept failing
    TIMEOUT = "timeout"  # a ring did not get ready, or stalled
    INTERNAL = "internal"  # a bug or an engine failure


# Kinds a member may answer with that say "not here, not now": the entry routes around the member.
ROUTE_AROUND = frozenset({FailureKind.BUSY, FailureKind.UNAVAILABLE})


class Failure(Exception):
    """A request that cannot be served. `param` names the offending request field, when one does."""

    def __init__(self, kind: FailureKind, message: str, *, param: str | None = None,
                 retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.kind, self.param, self.retry_after = kind, param, retry_after

    def __repr__(self) -> str:
        return f"Failure({self.kind.name}, {str(self)!r})"


def bad_request(message: str, param: str | None = None) -> Failure:
    return Failure(FailureKind.BAD_REQUEST, message, param=param)


def wire_kind(value: object) -> FailureKind:
    """A kind read off the wire; anything unknown counts as internal."""
    try:
        return FailureKind(value)
    except ValueError:
        return FailureKind.INTERNAL
