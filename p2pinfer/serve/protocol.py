"""The ring protocol's messages, in one place. Every frame header is a msgpack map with a type "t".

Control link (entry -> each member, one per member per request):
  entry -> member  open   {rid, model, n_layers, ring: [[peer, start, end]...], i, report, sampling,
                           stop_ids, max_new, ctx}
  member -> entry  ready  {} | error {kind, msg}   (kind: serve/failures.py FailureKind values)
  entry -> member  start  {}            (index 0's start frame carries the prompt as an int32 tensor)
  reporter -> entry  tok  {id, [lp, top]}  ...  done {reason: "stop" | "length"}
                   (lp: the token's logprob, top: [[id, logprob]...], when sampling asks for logprobs)
  entry -> member  end {}               (the request is over: finish your part, free its session)
                   | cancel {}          (stop now; or simply closing the link)
Data link (member i -> member i+1, and last -> first for the next token):
  data {rid}  then  h {last: bool, [id, lp, top]} + float32 hidden (T, H)  |  tok {id, [lp, top]}
                    |  done {reason, [id, lp, top]}

One frame per hop per token. The last member samples a token and sends it to the first member only
(`tok`, the next step's input); the token's fields then ride in the next step's `h` headers as far as
the reporter, the member at index `report`, which alone sends it to the entry. The entry makes itself
the reporter when it is a ring member (its control link is then in-process: no network copy at all),
else the last member reports as soon as it samples. The end travels the same way: `done` carries the
reason, and the final token when the answer ended by length; every member passes it on, the reporter
also tells the entry. Why: the entry's copy of each token was a second frame from the last member,
sent before the ring's own and so on its critical path, and often to the same peer as the ring's.
A reporter before the last member hears of a token one or more hops later; tokens per second are the
same. Members report after passing their own frame on, so the entry's streaming never delays a hop.

Streams outlive requests (serve/links.py keeps a pool per peer): a stream whose use ended cleanly goes
back to its opener's pool and carries a later request's control or data link, so a warm ring opens no
stream at all (an open costs ~1.6 ms median, p90 4 ms, on loopback under load: 5-7 ms of a 3-peer
ring's time to first token). The serving side of a stream says when its opener may reuse it, as the
first frame after a use:
  server -> opener  idle {}              (the handler is back at the top: the next frame starts a new use)
  opener -> server  ping {}              (answered by idle: a stream idle for a while is probed first)
A use ends cleanly when the control link ended with `end` (the member's session is closed before
`idle`), or when a data link carried the ring's `done` and the receiver read it. Anything else (a
cancel, an error, a lost neighbour) closes the stream, as a finished request did before streams were
pooled. A member that knows no `end` or `idle` (an older version) just lets the opener's wait for
`idle` time out, and the stream is closed.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

OPEN, READY, START, TOK, DONE, ERROR, CANCEL, END, DATA, HIDDEN = (
    "open", "ready", "start", "tok", "done", "error", "cancel", "end", "data", "h",
)  # fmt: skip
IDLE, PING = "idle", "ping"  # a pooled stream's reuse (serve/links.py)

# Prompt hidden states cross the wire in chunks of this many positions, so member i+1 computes
# chunk n while member i computes chunk n+1 (pipelined prefill), and no frame gets huge.
WIRE_PREFILL_CHUNK = 128


SAMPLING_KEYS = {"temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty", "logprobs", "recent"}


class ProtocolError(Exception):
    """A frame that does not follow the protocol; the link it came on is dropped."""


_INT32 = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
_COUNT = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
_FINITE = Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)]


class WireSampling(BaseModel):
    """The sampling fields an open header may carry (engine/sampling.py SamplingParams checks the values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: _FINITE | None = None
    top_p: _FINITE | None = None
    top_k: _COUNT | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**64 - 1)] | None = None
    min_p: _FINITE | None = None
    repetition_penalty: _FINITE | None = None
    frequency_penalty: _FINITE | None = None
    presence_penalty: _FINITE | None = None
    logprobs: _COUNT | None = None
    recent: list[_INT32] = Field(default_factory=list, max_length=4096)


class OpenRequest(BaseModel):
    """The open header: the whole ring, this member's place in it, and the request (typed: pydantic
    checks every field before a member acts on it; a bad header is a ProtocolError)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    rid: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    n_layers: Annotated[StrictInt, Field(ge=1, le=100_000)]
    ring: Annotated[list[tuple[StrictStr, _COUNT, _COUNT]], Field(min_length=1, max_length=1024)]
    index: Annotated[_COUNT, Field(alias="i")]
    sampling: WireSampling
    stop_ids: Annotated[list[_INT32], Field(max_length=64)]
    max_new: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
    ctx: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
    report: Annotated[StrictInt, Field(ge=-1, le=1023)] = -1  # the member that sends tokens to the entry; -1: last

    @model_validator(mode="after")
    def _consistent(self) -> OpenRequest:
        if self.index >= len(self.ring) or self.report >= len(self.ring):
            raise ValueError("ring index out of range")
        expected = 0
        for _, s, e in self.ring:
            if s != expected or e <= s:
                raise ValueError("ring layer ranges are not contiguous")
            expected = e
        if expected != self.n_layers:
            raise ValueError("ring does not cover every layer")
        return self

    @property
    def reporter(self) -> int:
        return self.report if self.report >= 0 else len(self.ring) - 1

    @property
    def is_reporter(self) -> bool:
        return self.index == self.reporter

    @property
    def start(self) -> int:
        return self.ring[self.index][1]

    @property
    def end(self) -> int:
        return self.ring[self.index][2]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == len(self.ring) - 1

    def peer_after(self) -> str:
        return self.ring[(self.index + 1) % len(self.ring)][0]

    def sampling_fields(self) -> dict:
        """The sampling fields that were sent, for SamplingParams."""
        return self.sampling.model_dump(exclude_unset=True)

    def to_header(self) -> dict:
        h = self.model_dump(by_alias=True, mode="python")
        h["sampling"] = self.sampling_fields()
        h["ring"] = [list(m) for m in self.ring]
        h["report"] = self.reporter
        return {"t": OPEN, **h}

    @classmethod
    def from_header(cls, h: dict) -> OpenRequest:
        if not isinstance(h, dict):
            raise ProtocolError("malformed open header: not a map")
        try:
            return cls.model_validate({k: v for k, v in h.items() if k != "t"})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "header"
            raise ProtocolError(f"malformed open header: {where}: {err['msg']}") from None


TOKEN_FIELDS = ("id", "lp", "top")


def token_fields(header: dict) -> dict:
    """The sampled token's fields a data frame carries ({} when none), checked: a malformed one
    ends the link it came on (ProtocolError), never the peer."""
    if "id" not in header:
        return {}
    try:
        out = {"id": int(header["id"])}
        if "lp" in header:
            out["lp"] = float(header["lp"])
            out["top"] = [[int(i), float(p)] for i, p in header.get("top") or []]
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"malformed token fields: {type(e).__name__}") from e
    if not 0 <= out["id"] < 2**31:
        raise ProtocolError(f"token id {out['id']} out of range")
    return out
