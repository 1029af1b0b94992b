"""Request and reply schemas shared by the batch job, the queue and the client.

Everything a client sends is checked here, cheapest first, before any model work: the size of
the raw body, its encoding, its JSON (no NaN, no nesting deeper than the parser allows), the fields
and their ranges, then the number of messages and characters. Each failure is a RequestError
with a stable `kind` and a one-line message; nothing a client sends raises anything else.
"""

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

FinishReason = Literal["stop", "length", "error"]
MAX_ID_LENGTH = 256
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class Limits:
    """What one request may hold; from the settings (MAX_REQUEST_BYTES, MAX_MESSAGES, ...)."""

    max_request_bytes: int = 1_048_576
    max_messages: int = 256
    max_prompt_chars: int = 100_000


def _clean_text(value: str) -> str:
    """Refuse what no tokenizer, JSON writer or database should receive: lone surrogates (not
    encodable as UTF-8) and NUL characters."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return value


def _check_id(value: object) -> str | int | float:
    """Any JSON id: a non-empty string or a number; replies carry it back unchanged."""
    if isinstance(value, str):
        if not 1 <= len(value) <= MAX_ID_LENGTH:
            raise ValueError(f"must be 1 to {MAX_ID_LENGTH} characters")
        return _clean_text(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if isinstance(value, int) and abs(value) >= 2**63:
        raise ValueError("is too large for a 64-bit integer")
    return value


Text = Annotated[str, AfterValidator(_clean_text)]
RequestId = Annotated[str | int | float, BeforeValidator(_check_id)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class Request(BaseModel):
    """One generation request; fields left out take the service's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: RequestId
    messages: list[ChatMessage] | None = None
    prompt: Text | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[Annotated[Text, Field(max_length=MAX_STOP_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )
    # False: `prompt` goes to the model verbatim, as OpenAI's /v1/completions sends it.
    chat_template: bool = True
    # True: a worker also publishes the text as it is decoded, as chunk messages to reply_to
    # (`{"id", "offset", "delta"}`, AMQP type "chunk"), before the reply.
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "Request":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' is empty")
        if not self.chat_template and self.prompt is None:
            raise ValueError("'chat_template' false needs a 'prompt'")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template input: `prompt` becomes one user turn."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def characters(self) -> int:
        """Characters of text the request brings (its prompt or all its messages)."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        return len(self.prompt or "")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ErrorInfo(BaseModel):
    type: str
    message: str


class Reply(BaseModel):
    id: str | int | float
    text: str = ""
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = 0.0
    error: ErrorInfo | None = None

    @classmethod
    def failure(
        cls, request_id: str | int | float, error: "RequestError", latency_ms: float = 0.0
    ) -> "Reply":
        return cls(
            id=request_id,
            finish_reason="error",
            latency_ms=latency_ms,
            error=ErrorInfo(type=error.kind, message=str(error)),
        )


class RequestError(ValueError):
    """A request that cannot be served; `kind` is a stable machine-readable name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse_request(
    raw: bytes | str | dict[str, Any],
    fallback_id: str | None = None,
    limits: Limits | None = None,
) -> Request:
    """Return the validated request in `raw` (bytes, JSON text or an already decoded object).

    `fallback_id` names a request that has no usable id of its own (a line number, a message id).
    Raises RequestError with a one-line message for an oversized body, undecodable bytes, bad
    JSON, bad fields and requests over `limits`.
    """
    limits = limits or Limits()
    if isinstance(raw, bytes | str):
        raw = decode_json(raw, limits.max_request_bytes)
    if not isinstance(raw, dict):
        raise RequestError("invalid_request", "request must be a JSON object")
    if "id" not in raw and fallback_id is not None:
        raw = {**raw, "id": fallback_id}
    _check_counts(raw, limits)
    try:
        request = Request.model_validate(raw)
    except ValidationError as exc:
        raise RequestError("invalid_request", describe(exc)) from None
    except RecursionError:
        raise RequestError("invalid_request", "request nests too deep") from None
    if request.characters() > limits.max_prompt_chars:
        raise RequestError(
            "request_too_large",
            f"request has {request.characters()} characters of text, over the limit of "
            f"{limits.max_prompt_chars}",
        )
    return request


def decode_json(raw: bytes | str, max_bytes: int) -> Any:
    """The JSON value in `raw`, checked for size, encoding, NaN/Infinity and nesting depth (the
    parser's RecursionError, caught: it once stopped the worker's consumer)."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise RequestError(
            "request_too_large", f"request is {size} bytes, over the limit of {max_bytes}"
        )
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("invalid_encoding", f"request is not UTF-8: {exc.reason}") from None
    raw = raw.removeprefix("\ufeff")  # a byte-order mark, as some editors write
    if not raw.strip():
        raise RequestError("invalid_json", "request is empty")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise RequestError("invalid_json", f"request is not JSON: {exc.msg}") from None
    except RecursionError:  # the C parser's own limit (about 1,000 levels): no scan of ours
        deep = "request nests deeper than JSON parsing allows"
        raise RequestError("invalid_json", deep) from None
    except ValueError as exc:
        raise RequestError("invalid_json", f"request is not JSON: {exc}") from None


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_counts(raw: dict[str, Any], limits: Limits) -> None:
    messages = raw.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise RequestError(
            "request_too_large",
            f"request has {len(messages)} messages, over the limit of {limits.max_messages}",
        )


def request_id_of(raw: object, fallback: str, max_bytes: int = 1_048_576) -> str | int | float:
    """Best-effort id of a raw request, to address an error reply to it: its own id when that
    id is valid, else `fallback`."""
    if isinstance(raw, bytes | str):
        try:
            raw = decode_json(raw, max_bytes)
        except RequestError:
            return fallback
    if not isinstance(raw, dict) or "id" not in raw:
        return fallback
    try:
        return _check_id(raw["id"])
    except ValueError:
        return fallback


def describe(exc: ValidationError) -> str:
    """Pydantic's errors on one line: `field: problem; field: problem` (at most five)."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
