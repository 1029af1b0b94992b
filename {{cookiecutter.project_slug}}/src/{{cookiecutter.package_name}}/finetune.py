"""LoRA fine-tuning on chat JSONL: validate, tokenize with assistant-only labels, train, merge.

No settings, CLI or tracking code here: callers pass plain arguments and an `on_step` callback.
"""

import json
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from {{ cookiecutter.package_name }}.model_source import ModelSourceError
from {{ cookiecutter.package_name }}.settings import SettingsError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a token that is not trained on (prompt, system turn, padding)
MAX_LINES_SHOWN = 10


class DatasetError(ValueError):
    """A fine-tuning data file cannot be used; the one-line message names the file and line."""


@dataclass(frozen=True)
class LoraParams:
    """What a fine-tuning run does.

    The defaults teach the sample data's fact in about 35 s on a 2-core CPU (30 steps of ~1 s).
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-3
    steps: int = 30
    batch_size: int = 4
    max_seq_len: int = 256
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be positive"
            for name in ("rank", "alpha", "steps", "batch_size", "max_seq_len")
            if getattr(self, name) <= 0
        ]
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.learning_rate <= 0.0:
            problems.append("learning_rate must be positive")
        if not self.target_modules:
            problems.append("target_modules must name at least one module")
        if problems:
            raise ValueError(f"invalid LoRA parameters: {'; '.join(problems)}")


def _check_target_modules(model: Any, wanted: tuple[str, ...]) -> None:
    """Raise SettingsError (one line) if a LoRA target module is not a layer of this model."""
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    missing = sorted(set(wanted) - linear)
    if missing:
        raise SettingsError(
            f"invalid settings: LORA_TARGET_MODULES names {', '.join(missing)}, which this model "
            f"does not have; its linear layers are {', '.join(sorted(linear))}"
        )


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


@dataclass(frozen=True)
class TrainResult:
    """What a run did. Losses are mean cross-entropy per assistant token."""

    eval_loss_before: float
    eval_loss_after: float
    losses: tuple[float, ...]  # training loss of each step, in order
    steps: int
    seconds: float  # the training steps only
    total_seconds: float  # loading, evaluating, training, merging and saving
    adapter_dir: Path
    merged_dir: Path
    trainable_params: int
    total_params: int
    train_examples: int
    eval_examples: int
    skipped_examples: int
    device: str
    params: LoraParams

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def improved(self) -> bool:
        return self.eval_loss_after < self.eval_loss_before


# ---------------------------------------------------------------------------------------------
# Data


def read_chats(path: Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for each non-blank line of a chat JSONL file.

    Each line is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
    with at least one assistant turn. Raises FileNotFoundError if the file is missing and
    DatasetError, naming the file and line, for the first bad line or for a file without examples.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    chats = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                chats.append((number, _parse_chat(path, number, line)))
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
    """(input_ids, labels) of a chat rendered with the tokenizer's chat template.

    Labels are IGNORE everywhere except on each assistant turn's content and its end-of-turn
    token (the tokenizer's eos, e.g. `<|im_end|>`), so the model learns what to say and when to
    stop. The spans come from rendering each prefix of the chat and diffing the texts; raises
    ValueError if the template does not render prefixes consistently.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise ValueError("the chat template does not render this chat's prefixes consistently")
        end = len(through)
        eos = tokenizer.eos_token
        if eos:  # stop after the end-of-turn token: what follows it (a newline) is scaffolding
            found = through.rfind(eos, len(prompt))
            end = found + len(eos) if found >= 0 else end
        spans.append((len(prompt), end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token if any(start < end and begin < stop for begin, end in spans) else IGNORE
        for token, (start, stop) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    return input_ids, labels


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def load_chat_dataset(
    path: Path, tokenizer: Any, max_seq_len: int, skip_long: bool = False
) -> ChatDataset:
    """Read, validate and tokenize a chat JSONL file.

    Examples longer than `max_seq_len` tokens raise DatasetError naming how many and which lines,
    unless `skip_long`, which logs them and leaves them out. Raises FileNotFoundError or
    DatasetError (see `read_chats`), also when no example is left.
    """
    examples, long = [], []
    for number, messages in read_chats(path):
        try:
            input_ids, labels = tokenize_chat(tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a template that fails on a chat is a data error
            raise DatasetError(f"{path}, line {number}: {_one_line(exc)}") from None
        if len(input_ids) > max_seq_len:
            long.append((number, len(input_ids)))
        else:
            examples.append(TokenizedExample(number, tuple(input_ids), tuple(labels)))
    if long and not skip_long:
        raise DatasetError(
            f"{path}: {_count(long)} longer than max_seq_len={max_seq_len} tokens "
            f"({_lines(long, with_lengths=True)}); shorten them, raise max_seq_len, "
            "or skip them with skip_long"
        )
    if long:
        log.warning(
            "%s: skipped %s longer than max_seq_len=%d tokens (%s)",
            path,
            _count(long),
            max_seq_len,
            _lines(long, with_lengths=False),
        )
    if not examples:
        raise DatasetError(f"{path}: no examples left after skipping the long ones")
    return ChatDataset(path, tuple(examples), tuple(number for number, _ in long))


def _count(long: list[tuple[int, int]]) -> str:
    return f"{len(long)} example{'s' if len(long) != 1 else ''}"


def _lines(long: list[tuple[int, int]], with_lengths: bool) -> str:
    shown = [f"{n} ({tokens} tokens)" if with_lengths else str(n) for n, tokens in long]
    more = len(shown) - MAX_LINES_SHOWN
    label = "line" if len(long) == 1 else "lines"
    return f"{label} {', '.join(shown[:MAX_LINES_SHOWN])}" + (
        f" and {more} more" if more > 0 else ""
    )


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer.

    Raises ModelSourceError if it cannot be loaded and ValueError if it has no chat template.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - a broken model directory is one clear line
        raise ModelSourceError(
            f"cannot load the tokenizer in {model_dir}: {_one_line(exc)}"
        ) from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template; use a chat model")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Training


def train_lora(
    model_dir: Path,
    train_data: Path | ChatDataset,
    eval_data: Path | ChatDataset,
    params: LoraParams,
    out_dir: Path,
    on_step: Callable[[int, float], None] | None = None,
    device: str = "auto",
    skip_long: bool = False,
) -> TrainResult:
    """Train a LoRA adapter on `train_data`, then save it and the merged model.

    Data given as paths is loaded with `load_chat_dataset` (`skip_long` applies). The eval loss
    (mean over `eval_data`'s assistant tokens) is measured before and after training.
    `on_step(step, loss)` is called after each step (1-based). Writes the adapter to
    out_dir/adapter and the merged model and tokenizer to out_dir/merged (safetensors, loadable
    like any model directory). Returns a TrainResult. Raises FileNotFoundError or DatasetError
    for bad data, ModelSourceError if the model cannot be loaded (or device="cuda" without
    CUDA), FileExistsError if out_dir/adapter or out_dir/merged already has files.
    """
    started = time.perf_counter()
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    for target in (adapter_dir, merged_dir):
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(f"{target} already has files; choose another output folder")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.backends.hf import pick_device

    tokenizer = load_tokenizer(model_dir)
    train_set = _dataset(train_data, tokenizer, params, skip_long)
    eval_set = _dataset(eval_data, tokenizer, params, skip_long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    _seed_everything(params.seed)
    target_device = pick_device(device)
    # float32 everywhere: the model is small, and half-precision LoRA needs loss scaling.
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a broken model directory is one clear line
        raise ModelSourceError(f"cannot load the model in {model_dir}: {_one_line(exc)}") from None
    model.config.use_cache = False
    _check_target_modules(model, params.target_modules)
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=list(params.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft asks for a property that transformers 5 renamed
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        model = get_peft_model(model, config).to(target_device)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s: %s trainable of %s parameters, %d train / %d eval examples, on %s",
        params.rank,
        ",".join(params.target_modules),
        f"{trainable:,}",
        f"{total:,}",
        len(train_set.examples),
        len(eval_set.examples),
        target_device,
    )

    eval_before = evaluate(model, eval_set.examples, params.batch_size, pad_id, target_device)
    log.info("eval loss before training: %.4f", eval_before)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / params.steps
    )  # linear decay to zero over the run
    batches = _batches(train_set.examples, params.batch_size, params.seed)
    losses = []
    model.train()
    train_started = time.perf_counter()
    for step in range(1, params.steps + 1):
        batch = collate(next(batches), pad_id, target_device)
        loss_sum, tokens = _token_loss(model, batch)
        loss = loss_sum / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], params.max_grad_norm
        )
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log.info(
            "step %d/%d loss %.4f (%.2f s/step)",
            step,
            params.steps,
            losses[-1],
            (time.perf_counter() - train_started) / step,
        )
        if on_step is not None:
            on_step(step, losses[-1])
    train_seconds = time.perf_counter() - train_started
    eval_after = evaluate(model, eval_set.examples, params.batch_size, pad_id, target_device)
    log.info("eval loss after training: %.4f (before %.4f)", eval_after, eval_before)

    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    log.info("adapter saved to %s, merged model to %s", adapter_dir, merged_dir)
    return TrainResult(
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        losses=tuple(losses),
        steps=params.steps,
        seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        trainable_params=trainable,
        total_params=total,
        train_examples=len(train_set.examples),
        eval_examples=len(eval_set.examples),
        skipped_examples=len(train_set.skipped_lines) + len(eval_set.skipped_lines),
        device=str(target_device),
        params=params,
    )


@torch.no_grad()
def evaluate(
    model: Any,
    examples: Sequence[TokenizedExample],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> float:
    """Mean cross-entropy per trained (assistant) token over `examples`, dropout off."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss_sum, count = _token_loss(
            model, collate(examples[start : start + batch_size], pad_id, device)
        )
        total += loss_sum.item()
        tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def _dataset(
    data: Path | ChatDataset, tokenizer: Any, params: LoraParams, skip_long: bool
) -> ChatDataset:
    if isinstance(data, ChatDataset):
        return data
    return load_chat_dataset(Path(data), tokenizer, params.max_seq_len, skip_long)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _batches(
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


def collate(
    examples: Sequence[TokenizedExample], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        mask[row, :length] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def _token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of trained tokens): each token predicts the next one."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((targets != IGNORE).sum())
