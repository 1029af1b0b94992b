"""The reply writer and the plan that make jobs resumable, on files only (no model)."""

import json

import pytest

from {{ cookiecutter.package_name }}.messages import ErrorInfo, Reply
from {{ cookiecutter.package_name }}.serving.replies import (
    OutputError,
    ReplyWriter,
    plan,
    reply_key,
)


def reply(request_id: str | int, text: str = "ok") -> Reply:
    return Reply(id=request_id, text=text, finish_reason="stop")


def test_replies_are_appended_as_they_come_and_put_in_input_order_at_the_end(tmp_path):
    target = tmp_path / "out" / "replies.jsonl"
    writer = ReplyWriter(target)
    assert not target.exists()  # nothing is touched before the first reply
    writer.write(reply(2))
    writer.write(reply("a"))
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [2, "a"]
    writer.finish([reply_key("a"), reply_key(2)])
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == ["a", 2]


def test_resume_keeps_whole_lines_and_drops_a_torn_one(tmp_path):
    target = tmp_path / "replies.jsonl"
    writer = ReplyWriter(target)
    writer.write(reply("a", "first"))
    writer.close()
    with target.open("a") as out:
        out.write('{"id": "b", "te')  # killed mid-write
    resumed = ReplyWriter(target, resume=True)
    assert set(resumed.answered) == {reply_key("a")}
    resumed.write(reply("b"))
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in lines] == [("a", "first"), ("b", "ok")]


def test_the_plan_skips_answered_ids_and_names_duplicates_by_line(tmp_path):
    lines = [
        ("line-1", b'{"id": "a", "prompt": "x"}'),
        ("line-2", b'{"id": "line-3", "prompt": "x"}'),
        ("line-3", b'{"id": "a", "prompt": "x"}'),
        ("line-4", b'{"id": 1, "prompt": "x"}'),
        ("line-5", b"not json"),
    ]
    todo = plan(lines, answered={reply_key(1)})
    assert [name for name, _ in todo.todo] == ["line-1", "line-2", "line-5"]
    (duplicate,) = todo.duplicates
    assert duplicate.id == "line-3-duplicate" and duplicate.error.type == "duplicate_id"
    assert len(set(todo.order)) == len(lines)  # every line has its own key


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    with pytest.raises(OutputError, match="it is a folder"):
        ReplyWriter(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not writable"):
        ReplyWriter(tmp_path / "file" / "replies.jsonl")


def test_a_timed_out_reply_is_kept_until_a_real_one_replaces_it(tmp_path):
    target = tmp_path / "replies.jsonl"
    writer = ReplyWriter(target)
    writer.write(Reply(id="t", finish_reason="error", error=ErrorInfo(type="timeout", message="")))
    writer.write(reply("t", "late but real"))
    assert writer.finish([reply_key("t")])[0].text == "late but real"
