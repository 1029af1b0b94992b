import json

import pytest

from {{ cookiecutter.package_name }}.messages import (
    Reply,
    RequestError,
    parse_request,
    request_id_of,
)


def test_a_prompt_request_becomes_one_user_turn():
    request = parse_request(b'{"id": "r1", "prompt": "Hi"}')
    assert request.chat() == [{"role": "user", "content": "Hi"}]
    assert request.max_new_tokens is None  # filled from settings later


def test_a_chat_request_keeps_its_messages():
    raw = {
        "id": "r2",
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
    }
    assert [m["role"] for m in parse_request(raw).chat()] == ["system", "user"]


def test_a_missing_id_takes_the_fallback():
    assert parse_request('{"prompt": "Hi"}', fallback_id="line-3").id == "line-3"


@pytest.mark.parametrize(
    ("raw", "kind", "words"),
    [
        (b"\xff\xfe not utf-8", "invalid_encoding", "not UTF-8"),
        (b"", "invalid_json", "empty"),
        (b"   ", "invalid_json", "empty"),
        (b"{not json", "invalid_json", "not JSON"),
        (b"[1, 2]", "invalid_request", "JSON object"),
        (b'{"id": "x"}', "invalid_request", "exactly one of"),
        (
            b'{"id": "x", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
            "invalid_request",
            "exactly one of",
        ),
        (b'{"id": "x", "messages": []}', "invalid_request", "empty"),
        (b'{"id": "x", "prompt": "   "}', "invalid_request", "empty"),
        (
            b'{"id": "x", "messages": [{"role": "wizard", "content": "b"}]}',
            "invalid_request",
            "role",
        ),
        (
            b'{"id": "x", "messages": [{"role": "assistant", "content": "b"}]}',
            "invalid_request",
            "assistant",
        ),
        (
            b'{"id": "x", "prompt": "a", "max_new_tokens": "many"}',
            "invalid_request",
            "max_new_tokens",
        ),
        (b'{"id": "x", "prompt": "a", "max_new_tokens": 0}', "invalid_request", "max_new_tokens"),
        (b'{"id": "x", "prompt": "a", "temperature": 9}', "invalid_request", "temperature"),
        (b'{"id": "x", "prompt": "a", "top_p": 0}', "invalid_request", "top_p"),
        (b'{"id": "x", "prompt": "a", "stop": [""]}', "invalid_request", "stop"),
        (b'{"id": "x", "prompt": "a", "colour": "red"}', "invalid_request", "colour"),
        (b'{"id": 7, "prompt": "a"}', "invalid_request", "id"),
        (b'{"id": "", "prompt": "a"}', "invalid_request", "id"),
    ],
)
def test_bad_requests_raise_one_line_errors_with_a_stable_kind(raw, kind, words):
    with pytest.raises(RequestError) as caught:
        parse_request(raw)
    assert caught.value.kind == kind
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_error_reply_is_addressed_to_the_request_when_its_id_can_be_read():
    assert request_id_of(b'{"id": "abc", "prompt": 5}', "line-1") == "abc"
    assert request_id_of(b"{broken", "line-1") == "line-1"
    assert request_id_of({"id": 5}, "line-2") == "line-2"


def test_a_failure_reply_serializes_to_the_documented_shape():
    reply = Reply.failure("r9", RequestError("invalid_json", "request is not JSON"))
    assert json.loads(reply.model_dump_json()) == {
        "id": "r9",
        "text": "",
        "finish_reason": "error",
        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        "latency_ms": 0.0,
        "error": {"type": "invalid_json", "message": "request is not JSON"},
    }
