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
        (b'{"id": true, "prompt": "a"}', "invalid_request", "id"),
        (b'{"id": [7], "prompt": "a"}', "invalid_request", "id"),
        (b'{"id": "", "prompt": "a"}', "invalid_request", "id"),
    ],
)
def test_bad_requests_raise_one_line_errors_with_a_stable_kind(raw, kind, words):
    with pytest.raises(RequestError) as caught:
        parse_request(raw)
    assert caught.value.kind == kind
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


HOSTILE = {
    "lone surrogate in content": (rb'{"id": "x", "prompt": "a\ud800b"}', "surrogate"),
    "lone surrogate in id": (rb'{"id": "\udfff", "prompt": "a"}', "surrogate"),
    "NUL in content": (rb'{"id": "x", "prompt": "a\u0000b"}', "NUL"),
    "NaN": (b'{"id": "x", "prompt": "a", "top_p": NaN}', "NaN"),
    "Infinity": (b'{"id": "x", "prompt": "a", "temperature": Infinity}', "Infinity"),
    "overflowing number": (b'{"id": "x", "prompt": "a", "temperature": 1e999}', "finite"),
    "negative temperature": (b'{"id": "x", "prompt": "a", "temperature": -0.5}', "temperature"),
    "infinite id": (b'{"id": 1e400, "prompt": "a"}', "finite"),
    "huge integer id": (b'{"id": 123456789012345678901234567890, "prompt": "a"}', "64-bit"),
    "5000 levels deep": (b'{"id": "x", "prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                         "deeper"),
    "2 MB body": (b'{"id": "x", "prompt": "' + b"a" * 2_000_000 + b'"}', "bytes"),
    "too many messages": (
        json.dumps({"id": "x", "messages": [{"role": "user", "content": "a"}] * 300}).encode(),
        "300 messages",
    ),
    "too many characters": (json.dumps({"id": "x", "prompt": "a" * 100_001}).encode(),
                            "characters"),
    "too many stop strings": (json.dumps({"id": "x", "prompt": "a", "stop": ["s"] * 10000})
                              .encode(), "stop"),
    "one stop string too long": (json.dumps({"id": "x", "prompt": "a", "stop": ["s" * 300]})
                                 .encode(), "stop"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_requests_are_refused_in_one_line(case):
    raw, words = HOSTILE[case]
    with pytest.raises(RequestError) as caught:
        parse_request(raw)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    Reply.failure(request_id_of(raw, "fallback"), caught.value).model_dump_json()  # serializable


@pytest.mark.parametrize("request_id", ["q1", 7, -3, 2.5, "ü" * 256])
def test_any_json_id_is_accepted_and_carried_back(request_id):
    raw = json.dumps({"id": request_id, "prompt": "Hi"}).encode()
    assert parse_request(raw).id == request_id
    assert json.loads(Reply(id=request_id, finish_reason="stop").model_dump_json())["id"] == (
        request_id
    )


def test_a_byte_order_mark_is_accepted():
    assert parse_request(b'\xef\xbb\xbf{"id": "b", "prompt": "Hi"}').id == "b"


def test_an_error_reply_is_addressed_to_the_request_when_its_id_can_be_read():
    assert request_id_of(b'{"id": "abc", "prompt": 5}', "line-1") == "abc"
    assert request_id_of(b"{broken", "line-1") == "line-1"
    assert request_id_of({"id": 5}, "line-2") == 5
    assert request_id_of({"id": True}, "line-3") == "line-3"
    assert request_id_of(rb'{"id": "\ud800"}', "line-4") == "line-4"


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
