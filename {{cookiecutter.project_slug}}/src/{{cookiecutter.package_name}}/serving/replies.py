"""The files of a job: JSONL requests in, JSONL replies out, written as they come, resumable.

Replies are appended to the output as soon as each is known (and flushed), so a job stopped by
SIGTERM, kill -9 or a crash leaves a valid JSONL prefix; `--resume` skips the ids already there
and, once every line is answered, the file is rewritten in input order. The file batch job,
`submit` and the Ray batch job all write through `ReplyWriter`.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..messages import Reply, RequestError, request_id_of
from ..stats import Summary, summarize


def read_requests(path: Path) -> list[tuple[str, bytes]]:
    """(fallback id, raw line) for each non-blank line; raises FileNotFoundError if missing."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with path.open("rb") as lines:
        return [(f"line-{n}", line) for n, line in enumerate(lines, 1) if line.strip()]


class OutputError(ValueError):
    """The output file cannot be written; found before any model is loaded."""


def reply_key(request_id: str | int | float) -> str:
    """One key per JSON id: 1, 1.5 and "1" are three different ids."""
    return json.dumps(request_id)


@dataclass
class Plan:
    """What a job has left to do: every input line's key in order, the lines not yet answered,
    and the error replies of lines that repeat an earlier line's id."""

    order: list[str] = field(default_factory=list)
    todo: list[tuple[str, bytes]] = field(default_factory=list)
    duplicates: list[Reply] = field(default_factory=list)


def plan(lines: list[tuple[str, bytes]], answered: set[str], max_bytes: int = 1_048_576) -> Plan:
    """The lines of `lines` whose ids are not in `answered` (the keys of replies already written).

    A line that repeats an earlier id is answered with a `duplicate_id` error under its line
    name, so every id appears in the output exactly once.
    """
    result = Plan()
    first_seen: dict[str, str] = {}
    for fallback_id, line in lines:
        request_id = request_id_of(line, fallback_id, max_bytes)
        key = reply_key(request_id)
        if key in first_seen:
            error = RequestError(
                "duplicate_id", f"id {request_id!r} appears twice (first at {first_seen[key]})"
            )
            name = fallback_id
            while reply_key(name) in first_seen:  # a line's own id may be "line-N" too
                name += "-duplicate"
            key = reply_key(name)
            first_seen[key] = fallback_id
            if key not in answered:
                result.duplicates.append(Reply.failure(name, error))
        else:
            first_seen[key] = fallback_id
            if key not in answered:
                result.todo.append((fallback_id, line))
        result.order.append(key)
    return result


class ReplyWriter:
    """Appends each reply to `target` as soon as it is known; `finish` puts them in input order.

    Opened with `resume`, the replies already in `target` are kept (a torn last line is
    dropped) and their ids are `answered`; else `target` starts empty. Raises OutputError at
    once if `target` cannot be written; the file itself is touched only by the first write.
    """

    def __init__(self, target: Path, resume: bool = False) -> None:
        self.target = target
        self.answered: dict[str, Reply] = _read_replies(target) if resume else {}
        self._file: IO[str] | None = None
        self.written = 0
        if target.is_dir():
            raise OutputError(f"cannot write replies to {target}: it is a folder")
        existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK) or not existing.is_dir():
            raise OutputError(f"cannot write replies to {target}: {existing} is not writable")

    def write(self, reply: Reply) -> None:
        try:
            if self._file is None:  # first write: keep what was kept, then append
                self.target.parent.mkdir(parents=True, exist_ok=True)
                write_replies(self.target, list(self.answered.values()))
                self._file = self.target.open("a", encoding="utf-8")
            self._file.write(reply.model_dump_json() + "\n")
            self._file.flush()  # in the kernel's hands: it survives the process being killed
        except OSError as exc:  # e.g. the disk is full: the job stops, resumable
            reason = exc.strerror or type(exc).__name__
            raise OutputError(f"cannot write replies to {self.target}: {reason}") from None
        self.answered[reply_key(reply.id)] = reply
        self.written += 1

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def finish(self, order: list[str]) -> list[Reply]:
        """Rewrite the file atomically with the replies of `order`, in that order; return them."""
        self.close()
        replies = [self.answered[key] for key in order if key in self.answered]
        write_replies(self.target, replies)
        return replies


def _read_replies(target: Path) -> dict[str, Reply]:
    answered: dict[str, Reply] = {}
    if not target.is_file():
        return answered
    with target.open("rb") as lines:
        for line in lines:
            try:
                reply = Reply.model_validate_json(line)
            except ValueError:
                break  # a line torn by a kill: this and what follows are redone
            answered[reply_key(reply.id)] = reply
    return answered


class JobInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a job: what was written stays; the message says how to finish."""

    def __init__(self, writer: ReplyWriter) -> None:
        writer.close()
        super().__init__(
            f"interrupted: {len(writer.answered)} replies are in {writer.target}; "
            "run the same command with --resume to finish"
        )


def summarize_replies(
    replies: list[Reply], seconds: float, batch_sizes: Sequence[int] = ()
) -> Summary:
    """The throughput and latency of the replies a job produced."""
    served = [r for r in replies if r.error is None]
    return summarize(
        seconds,
        [r.latency_ms for r in served],
        sum(r.usage.completion_tokens for r in served),
        errors=len(replies) - len(served),
        batch_sizes=batch_sizes,
    )


def write_replies(target: Path, replies: list[Reply]) -> None:
    """Write JSONL atomically: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with partial.open("w", encoding="utf-8") as out:
        for reply in replies:
            out.write(reply.model_dump_json() + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, target)
