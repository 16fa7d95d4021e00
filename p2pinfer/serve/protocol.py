"""The ring protocol's messages, in one place. Every frame header is a msgpack map with a type "t".

Control link (entry -> each member, one per member per request):
  entry -> member  open   {rid, model, n_layers, ring: [[peer, start, end]...], i, report, sampling,
                           stop_ids, max_new, ctx}
  member -> entry  ready  {} | error {kind, msg}   (kind: serve/failures.py FailureKind values)
  entry -> member  start  {}            (index 0's start frame carries the prompt as an int32 tensor)
  reporter -> entry  tok  {id, [lp, top]}  ...  done {reason: "stop" | "length"}
                   (lp: the token's logprob, top: [[id, logprob]...], when sampling asks for logprobs)
  entry -> member  cancel {}            (or simply closing the link)
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

Streams live for one request: the entry opens a control stream per member, each member one data
stream to the next. An open costs ~1.6 ms median on loopback (two hosts, 60 opens, loaded box): a
few ms of a ring's time to first token, nothing per token. Keeping a ring's streams open across
requests would need an explicit end of request on both links instead of their closing; not done.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, READY, START, TOK, DONE, ERROR, CANCEL, DATA, HIDDEN = (
    "open", "ready", "start", "tok", "done", "error", "cancel", "data", "h",
)  # fmt: skip

# Prompt hidden states cross the wire in chunks of this many positions, so member i+1 computes
# chunk n while member i computes chunk n+1 (pipelined prefill), and no frame gets huge.
WIRE_PREFILL_CHUNK = 128


SAMPLING_KEYS = {"temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty", "logprobs", "recent"}


class ProtocolError(Exception):
    """A frame that does not follow the protocol; the link it came on is dropped."""


@dataclass(frozen=True)
class OpenRequest:
    rid: str
    model: str
    n_layers: int
    ring: tuple[tuple[str, int, int], ...]
    index: int
    sampling: dict
    stop_ids: tuple[int, ...]
    max_new: int
    ctx: int
    report: int = -1  # the member that sends tokens to the entry; -1: the last one

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

    def to_header(self) -> dict:
        return {
            "t": OPEN, "rid": self.rid, "model": self.model, "n_layers": self.n_layers,
            "ring": [list(m) for m in self.ring], "i": self.index, "sampling": self.sampling,
            "stop_ids": list(self.stop_ids), "max_new": self.max_new, "ctx": self.ctx, "report": self.reporter,
        }  # fmt: skip

    @classmethod
    def from_header(cls, h: dict) -> OpenRequest:
        try:
            ring = tuple((str(p), int(s), int(e)) for p, s, e in h["ring"])
            req = cls(
                rid=str(h["rid"]), model=str(h["model"]), n_layers=int(h["n_layers"]), ring=ring,
                index=int(h["i"]), sampling=dict(h["sampling"]), stop_ids=tuple(int(x) for x in h["stop_ids"]),
                max_new=int(h["max_new"]), ctx=int(h["ctx"]), report=int(h.get("report", -1)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"malformed open header: {type(e).__name__}: {e}") from e
        unknown = set(req.sampling) - SAMPLING_KEYS
        if unknown:
            raise ProtocolError(f"unknown sampling fields {sorted(unknown)}")
        if not 0 <= req.index < len(ring) or not -1 <= req.report < len(ring) or req.max_new < 1 or req.ctx < 1 \
                or not req.rid:  # fmt: skip
            raise ProtocolError("open header out of range")
        expected = 0
        for _, s, e in ring:
            if s != expected or e <= s:
                raise ProtocolError("ring layer ranges are not contiguous")
            expected = e
        if expected != req.n_layers:
            raise ProtocolError("ring does not cover every layer")
        return req


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
