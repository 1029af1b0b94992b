"""Request and reply schemas shared by the batch job, the queue and the client."""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FinishReason = Literal["stop", "length", "error"]
MAX_ID_LENGTH = 256
MAX_STOP_STRINGS = 8


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Request(BaseModel):
    """One generation request; fields left out take the service's defaults."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)

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
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template input: `prompt` becomes one user turn."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ErrorInfo(BaseModel):
    type: str
    message: str


class Reply(BaseModel):
    id: str
    text: str = ""
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = 0.0
    error: ErrorInfo | None = None

    @classmethod
    def failure(cls, request_id: str, error: "RequestError", latency_ms: float = 0.0) -> "Reply":
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


def parse_request(raw: bytes | str | dict[str, Any], fallback_id: str | None = None) -> Request:
    """Return the validated request in `raw` (bytes, JSON text or an already decoded object).

    `fallback_id` names a request that has no usable id of its own (a line number, a message id).
    Raises RequestError with a one-line message for undecodable bytes, bad JSON and bad fields.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("invalid_encoding", f"request is not UTF-8: {exc.reason}") from None
    if isinstance(raw, str):
        if not raw.strip():
            raise RequestError("invalid_json", "request is empty")
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestError("invalid_json", f"request is not JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise RequestError("invalid_request", "request must be a JSON object")
    if "id" not in raw and fallback_id is not None:
        raw = {**raw, "id": fallback_id}
    try:
        return Request.model_validate(raw)
    except ValidationError as exc:
        raise RequestError("invalid_request", describe(exc)) from None


def request_id_of(raw: object, fallback: str) -> str:
    """Best-effort id of a raw request, to address an error reply to it."""
    if isinstance(raw, bytes | str):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return fallback
    if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"]:
        return raw["id"][:MAX_ID_LENGTH]
    return fallback


def describe(exc: ValidationError) -> str:
    """Pydantic's errors on one line: `field: problem; field: problem`."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
