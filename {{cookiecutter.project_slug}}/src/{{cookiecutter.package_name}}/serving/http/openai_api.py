"""The OpenAI API's shapes: its requests become this service's request schema (`messages.py`,
so the HTTP API and the queue share one validation), its responses, stream chunks and errors
are built as OpenAI sends them.

A field OpenAI defines but this service does not implement is refused when it asks for
something (`n=2`, `logprobs=true`, a penalty) and accepted at its neutral value; a field OpenAI
does not define is refused, as OpenAI does ("Unrecognized request argument").
"""

import json
import time
from typing import Any, Literal

from ...messages import Limits, Reply, RequestError, decode_json

Endpoint = Literal["chat", "completion"]
# Field -> its neutral value: accepted only at that value (None counts as neutral too).
NEUTRAL: dict[str, object] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": False,
    "logit_bias": {},
    "response_format": {"type": "text"},
    # vLLM's and llama-server's extensions, which their clients send at these values
    "top_k": -1,
    "min_p": 0,
    "repetition_penalty": 1,
}
ALSO_NEUTRAL = {"top_k": 0}
IGNORED = {"user", "store", "metadata", "service_tier", "top_logprobs", "stream", "model"}
OURS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"}
SPECIFIC = {"chat": {"messages", "stream_options"}, "completion": {"prompt", "stream_options"}}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNREADABLE = "invalid_request_error"


def read_body(raw: bytes, endpoint: Endpoint, limits: Limits) -> dict[str, Any]:
    """The OpenAI request in `raw`, checked for size, encoding, JSON and known fields."""
    body = decode_json(raw, limits.max_request_bytes)
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "the request body must be a JSON object")
    unknown = sorted(set(body) - set(NEUTRAL) - IGNORED - OURS - SPECIFIC[endpoint])
    if unknown:
        raise RequestError("invalid_request", f"Unrecognized request argument: {unknown[0]}")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral, ALSO_NEUTRAL.get(name, neutral)):
            raise RequestError(
                "unsupported", f"{name}={json.dumps(body[name])[:60]} is not supported here"
            )
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise RequestError("invalid_request", "model: a model name is required")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("invalid_request", "stream: must be a boolean")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("invalid_request", "stream_options: only include_usage is supported")
    return body


def to_request(body: dict[str, Any], endpoint: Endpoint, request_id: str) -> dict[str, Any]:
    """This service's request (`messages.Request` fields) for an OpenAI request body."""
    request: dict[str, Any] = {"id": request_id}
    if endpoint == "chat":
        request["messages"] = _messages(body.get("messages"))
    else:
        request["prompt"] = _prompt(body.get("prompt"))
        request["chat_template"] = False
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    for ours, value in (
        ("max_new_tokens", limit),
        ("temperature", body.get("temperature")),
        ("top_p", body.get("top_p")),
        ("seed", body.get("seed")),
    ):
        if value is not None:
            request[ours] = value
    stop = body.get("stop")
    if stop is not None:
        request["stop"] = [stop] if isinstance(stop, str) else stop
    return request


def their_names(message: str) -> str:
    """An error message of the request schema, with OpenAI's field names."""
    return message.replace("max_new_tokens", "max_tokens")


def _messages(raw: object) -> object:
    if not isinstance(raw, list):
        return raw  # the schema says what is wrong
    messages = []
    for message in raw:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise RequestError("invalid_request", f"messages: role {role!r} is not supported")
        messages.append({"role": ROLES[message["role"]], "content": _content(message)})
    return messages


def _content(message: dict[str, Any]) -> object:
    """A message's text: a string, or the text of its `text` parts (OpenAI's content parts)."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise RequestError("invalid_request", "messages: only text content parts are supported")
        return "".join(str(part.get("text", "")) for part in content)
    return content


def _prompt(raw: object) -> object:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        return raw[0]
    if isinstance(raw, list):
        raise RequestError("invalid_request", "prompt: give one string (batches are not served)")
    return raw


# -- responses -------------------------------------------------------------------------------


def usage(reply: Reply) -> dict[str, int]:
    prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def response(reply: Reply, endpoint: Endpoint, model: str, created: int) -> dict[str, Any]:
    """The non-streamed response to a request that `reply` answered."""
    if endpoint == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text, "refusal": None},
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": reply.text,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        kind = "text_completion"
    return {
        "id": str(reply.id),
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(reply),
    }


class Chunks:
    """The `data:` events of one streamed response, framed as OpenAI frames them."""

    def __init__(
        self, request_id: str, endpoint: Endpoint, model: str, include_usage: bool
    ) -> None:
        self.endpoint, self.include_usage = endpoint, include_usage
        kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        self.head = {"id": request_id, "object": kind, "created": int(time.time()), "model": model}

    def first(self) -> bytes:
        """Chat streams open with the assistant's role and empty content."""
        return self._event({"role": "assistant", "content": ""}) if self.endpoint == "chat" else b""

    def delta(self, text: str) -> bytes:
        return self._event({"content": text} if self.endpoint == "chat" else text)

    def last(self, reply: Reply) -> bytes:
        """The finish reason, then the usage chunk when asked for, then [DONE]."""
        end = self._event({} if self.endpoint == "chat" else "", reply.finish_reason)
        if self.include_usage:
            end += event({**self.head, "choices": [], "usage": usage(reply)})
        return end + DONE

    def error(self, kind: str, message: str) -> bytes:
        """A failure after the stream began: an error event, then [DONE] (as vLLM does)."""
        return event(error_body(kind, message)) + DONE

    def _event(self, delta: object, finish_reason: str | None = None) -> bytes:
        if self.endpoint == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return event(chunk)


DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI writes it: compact JSON, then a blank line."""
    return (
        b"data: "
        + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        + b"\n\n"
    )


# OpenAI's error types by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(code: str, message: str, status: int = 400, param: str | None = None) -> dict:
    return {
        "error": {
            "message": their_names(message),
            "type": ERROR_TYPES.get(status, UNREADABLE),
            "param": param,
            "code": code,
        }
    }
