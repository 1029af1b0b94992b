"""Fine-tuning data: chat JSONL read and checked, tokenized with assistant-only labels, batched."""

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelSourceError, one_line

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a token that is not trained on (prompt, system turn, padding)
MAX_LINES_SHOWN = 10


class DatasetError(ValueError):
    """A fine-tuning data file cannot be used; the one-line message names the file and line."""


@dataclass(frozen=True)
class TokenizedExample:
    """One chat, tokenized: labels are IGNORE except on the assistant turns' tokens."""

    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class ChatDataset:
    """A validated, tokenized data file; `skipped_lines` were over max_seq_len and left out."""

    path: Path
    examples: tuple[TokenizedExample, ...]
    skipped_lines: tuple[int, ...] = ()


def read_chats(path: Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for each non-blank line of a chat JSONL file, whose lines are
    `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` with at least one
    assistant turn. Raises FileNotFoundError if the file is missing and DatasetError, naming the
    file and line, for the first bad line or for a file without examples."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with path.open(encoding="utf-8") as lines:
        chats = [(n, _parse_chat(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    if not chats:
        raise DatasetError(f"{path}: no examples (the file is empty)")
    return chats


def _parse_chat(path: Path, number: int, line: str) -> list[dict[str, str]]:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise DatasetError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object with a 'messages' list")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: expected a non-empty 'messages' list")
    for turn, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: message {turn} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(
                f"{where}: message {turn} has unknown role {role!r} (use {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise DatasetError(f"{where}: message {turn} has no string 'content'")
        if role == "assistant" and not content.strip():
            raise DatasetError(f"{where}: message {turn} is an assistant turn with empty content")
    if messages[0]["role"] == "assistant":
        raise DatasetError(f"{where}: the chat must start with a system or user turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: no assistant turn, so there is nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat rendered with the tokenizer's chat template. Labels are IGNORE
    except on each assistant turn's content and its end-of-turn token (the tokenizer's eos, e.g.
    `<|im_end|>`), so the model learns what to say and when to stop. The spans come from rendering
    each prefix of the chat; raises ValueError if the template renders prefixes inconsistently."""
    render = partial(tokenizer.apply_chat_template, tokenize=False)
    text, eos, spans = render(messages, add_generation_prompt=False), tokenizer.eos_token, []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], add_generation_prompt=True)
        through = render(messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise ValueError("the chat template does not render this chat's prefixes consistently")
        # stop after the end-of-turn token: what follows it (a newline) is scaffolding
        found = through.rfind(eos, len(prompt)) if eos else -1
        spans.append((len(prompt), found + len(eos) if found >= 0 else len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token if any(start < end and begin < stop for begin, end in spans) else IGNORE
        for token, (start, stop) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    return input_ids, labels


def load_chat_dataset(
    path: Path, tokenizer: Any, max_seq_len: int, skip_long: bool = False
) -> ChatDataset:
    """Read, validate and tokenize a chat JSONL file. Examples over `max_seq_len` tokens raise
    DatasetError naming how many and which lines, unless `skip_long`, which logs them and leaves
    them out. Raises FileNotFoundError or DatasetError (see `read_chats`), also if none is left."""
    examples, long = [], []
    for number, messages in read_chats(path):
        try:
            input_ids, labels = tokenize_chat(tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a template that fails on a chat is a data error
            raise DatasetError(f"{path}, line {number}: {one_line(exc)}") from None
        if len(input_ids) > max_seq_len:
            long.append((number, len(input_ids)))
        else:
            examples.append(TokenizedExample(number, tuple(input_ids), tuple(labels)))
    if long:
        count = f"{len(long)} example{'s' if len(long) != 1 else ''}"
        if not skip_long:
            raise DatasetError(
                f"{path}: {count} longer than max_seq_len={max_seq_len} tokens "
                f"({_lines(long, with_lengths=True)}); shorten them, raise max_seq_len, "
                "or skip them with skip_long"
            )
        shown = _lines(long, with_lengths=False)
        log.warning(
            "%s: skipped %s longer than max_seq_len=%d tokens (%s)", path, count, max_seq_len, shown
        )
    if not examples:
        raise DatasetError(f"{path}: no examples left after skipping the long ones")
    return ChatDataset(path, tuple(examples), tuple(number for number, _ in long))


def _lines(long: list[tuple[int, int]], with_lengths: bool) -> str:
    shown = [f"{n} ({tokens} tokens)" if with_lengths else str(n) for n, tokens in long]
    more = f" and {len(shown) - MAX_LINES_SHOWN} more" if len(shown) > MAX_LINES_SHOWN else ""
    return f"line{'s' if len(long) != 1 else ''} {', '.join(shown[:MAX_LINES_SHOWN])}{more}"


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer. Raises ModelSourceError if it cannot be loaded and ValueError if it
    has no chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - a broken model directory is one clear line
        raise ModelSourceError(
            f"cannot load the tokenizer in {model_dir}: {one_line(exc)}"
        ) from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template; use a chat model")
    return tokenizer


def collate(
    examples: Sequence[TokenizedExample], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids, labels, mask = (
        torch.full((len(examples), width), fill, dtype=torch.long) for fill in (pad_id, IGNORE, 0)
    )
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        mask[row, :length] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def endless_batches(
    examples: Sequence[TokenizedExample], batch_size: int, seed: int
) -> Iterator[list[TokenizedExample]]:
    """Endless batches: a fresh seeded shuffle each epoch; the last short batch of an epoch is
    topped up from the next epoch so every step sees `batch_size` examples (or all of them)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(examples))
    pending: list[TokenizedExample] = []
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        pending.extend(examples[i] for i in order)
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
