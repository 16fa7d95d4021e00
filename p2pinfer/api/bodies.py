"""OpenAI request bodies as typed models (pydantic), turned into serve's TextRequest.

Fields a client may send and we ignore (user, tools, ...) are allowed; a known field with a wrong
type or value is a 400 naming the field. Types are strict where JSON clients differ: `true` is not a
number, 5.0 is not a token count. The orchestration routes (fan-out branches, chain steps, batch
lines) validate their OpenAI-shaped parts with the same models.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from p2pinfer.cluster.routing import POLICIES
from p2pinfer.engine.sampling import MAX_TOP_LOGPROBS
from p2pinfer.serve.failures import bad_request
from p2pinfer.serve.generate import SAMPLING_FIELDS, ChatPrompt, TextRequest

MAX_STOP_SEQUENCES = 4


def _num(lo: float, hi: float):
    return Annotated[StrictFloat | StrictInt, Field(ge=lo, le=hi)] | None


def _int(lo: int, hi: int):
    return Annotated[StrictInt, Field(ge=lo, le=hi)] | None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: StrictStr


class Message(_Open):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Open):
    include_usage: StrictBool = False


class Extension(_Open):
    """Our own fields, under "p2pinfer" so they never clash with OpenAI's."""

    routing: Literal[POLICIES] | None = None  # type: ignore[valid-type]


class _Common(_Open):
    model: StrictStr | None = None
    max_tokens: _int(1, 10**9) = None
    max_completion_tokens: _int(1, 10**9) = None
    temperature: _num(0, 2) = None
    top_p: _num(0, 1) = None
    top_k: _int(0, 10**6) = None
    min_p: _num(0, 1) = None
    repetition_penalty: _num(0, 10) = None
    frequency_penalty: _num(-2, 2) = None
    presence_penalty: _num(-2, 2) = None
    seed: _int(-(2**63), 2**64 - 1) = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    p2pinfer: Extension | None = None

    def _request(self, prompt, logprobs: int | None, rid: str, tags: dict | None) -> TextRequest:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        sampling = {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}
        return TextRequest(prompt, self.model, self.max_tokens or self.max_completion_tokens, sampling, stops,
                           logprobs, self.p2pinfer.routing if self.p2pinfer else None, rid, tags or {})  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatBody(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: _int(0, MAX_TOP_LOGPROBS) = None

    def to_request(self, rid: str = "", tags: dict | None = None) -> TextRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        msgs = tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                     for m in self.messages)  # fmt: skip
        return self._request(ChatPrompt(msgs), (self.top_logprobs or 0) if self.logprobs else None, rid, tags)


class CompletionBody(_Common):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] | list[StrictInt]
    logprobs: _int(0, MAX_TOP_LOGPROBS) = None

    def to_request(self, rid: str = "", tags: dict | None = None) -> TextRequest:
        p = self.prompt
        prompt = p if isinstance(p, str) else p[0] if p and isinstance(p[0], str) else tuple(p)
        return self._request(prompt, self.logprobs, rid, tags)


def parse_body(body: object, chat: bool) -> ChatBody | CompletionBody:
    """A validated body; a 400 Failure naming the first wrong field otherwise."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return (ChatBody if chat else CompletionBody).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
        # unions report each branch ("stop.str", "stop.list[str]"): name the field, say what is wrong
        field = loc[0] if loc else None
        what = ".".join(x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool")) or "body"
        raise bad_request(f"'{what}': {err['msg']}", field) from None
