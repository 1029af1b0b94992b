"""The OpenAI shapes: requests mapped onto the request schema (or refused as OpenAI refuses
them), and stream chunks framed as OpenAI frames them."""

import json

import pytest

from {{ cookiecutter.package_name }}.messages import (
    Limits,
    Reply,
    RequestError,
    Usage,
    parse_request,
)
from {{ cookiecutter.package_name }}.serving.http.openai_api import (
    Chunks,
    read_body,
    to_request,
)

LIMITS = Limits()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def body(**fields: object) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def test_a_chat_request_maps_onto_the_request_schema():
    raw = body(
        max_tokens=9, temperature=0.5, top_p=0.9, seed=3, stop="x", n=1, user="u",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]},
        ],
    )  # fmt: skip
    request = parse_request(to_request(read_body(raw, "chat", LIMITS), "chat", "chatcmpl-1"))
    assert request.chat() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert (request.max_new_tokens, request.temperature, request.top_p) == (9, 0.5, 0.9)
    assert (request.seed, request.stop, request.id) == (3, ["x"], "chatcmpl-1")


def test_a_completion_sends_its_prompt_verbatim():
    raw = json.dumps({"model": "m", "prompt": ["Once upon"], "max_completion_tokens": 4}).encode()
    request = parse_request(to_request(read_body(raw, "completion", LIMITS), "completion", "c"))
    assert (request.prompt, request.chat_template, request.max_new_tokens) == (
        "Once upon",
        False,
        4,
    )


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (body(frobnicate=1), "invalid_request"),
        (body(n=2), "unsupported"),
        (body(logprobs=True), "unsupported"),
        (body(model=None), "invalid_request"),
        (body(stream="yes"), "invalid_request"),
        (body(stream_options={"include_usage": True, "x": 1}), "invalid_request"),
        (b'{"model": "m", "messages": [], "top_p": NaN}', "invalid_json"),
        (b"\xff\xfe", "invalid_encoding"),
        (b"[]", "invalid_request"),
        (b"x" * (LIMITS.max_request_bytes + 1), "request_too_large"),
    ],
)
def test_what_openai_refuses_is_refused(raw, kind):
    with pytest.raises(RequestError) as refused:
        read_body(raw, "chat", LIMITS)
    assert refused.value.kind == kind and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        ["hi"],
    ],
)
def test_messages_this_service_cannot_read_are_refused(messages):
    with pytest.raises(RequestError):
        to_request(read_body(body(messages=messages), "chat", LIMITS), "chat", "c")


def test_stream_chunks_are_compact_json_events_with_a_usage_chunk_and_done():
    chunks = Chunks("chatcmpl-1", "chat", "m", include_usage=True)
    reply = Reply(
        id="chatcmpl-1",
        text="hi",
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=1),
    )
    raw = chunks.first() + chunks.delta("hi") + chunks.last(reply)
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    parsed = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert [p["choices"][0]["delta"] for p in parsed[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "hi"},
        {},
    ]
    assert parsed[2]["choices"][0]["finish_reason"] == "stop"
    assert parsed[3]["choices"] == [] and parsed[3]["usage"]["total_tokens"] == 4
    assert b": " not in raw.replace(b"data: ", b"")  # compact separators


def test_an_error_after_the_stream_began_is_an_error_event_then_done():
    raw = Chunks("c", "chat", "m", include_usage=False).error(
        "generation_failed", "the engine stopped"
    )
    error, done, _ = raw.split(b"\n\n")
    assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == "generation_failed"
    assert done == b"data: [DONE]"
