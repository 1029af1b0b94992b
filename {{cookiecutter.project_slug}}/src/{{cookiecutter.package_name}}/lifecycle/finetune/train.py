"""LoRA training: fit an adapter on tokenized chats, measure the eval loss, merge and save. No
settings, CLI or tracking code here: callers pass plain arguments and an `on_step` callback."""

import logging
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ...errors import ModelSourceError, one_line
from ...settings import SettingsError
from .data import (
    IGNORE,
    ChatDataset,
    TokenizedExample,
    collate,
    endless_batches,
    load_chat_dataset,
    load_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraParams:
    """What a fine-tuning run does. The defaults teach the sample data's fact in about 35 s on a
    2-core CPU (30 steps of ~1 s)."""

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
    """Train a LoRA adapter on `train_data`, then save it and the merged model. Data given as
    paths is loaded with `load_chat_dataset` (`skip_long` applies). The eval loss (mean over
    `eval_data`'s assistant tokens) is measured before and after training. `on_step(step, loss)`
    is called after each step (1-based). Writes the adapter to out_dir/adapter and the merged
    model and tokenizer to out_dir/merged (safetensors, loadable like any model directory).
    Raises FileNotFoundError or DatasetError for bad data, ModelSourceError if the model cannot
    be loaded (or device="cuda" without CUDA), FileExistsError if out_dir/adapter or
    out_dir/merged already has files."""
    started = time.perf_counter()
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    for target in (adapter_dir, merged_dir):
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(f"{target} already has files; choose another output folder")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ...engine.hf import pick_device

    tokenizer = load_tokenizer(model_dir)
    train_set, eval_set = (
        data
        if isinstance(data, ChatDataset)
        else load_chat_dataset(Path(data), tokenizer, params.max_seq_len, skip_long)
        for data in (train_data, eval_data)
    )
    train, evals = train_set.examples, eval_set.examples
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    random.seed(params.seed)  # before the adapters are created: their init is random
    torch.manual_seed(params.seed)  # also seeds every CUDA device
    target_device = pick_device(device)
    # float32 everywhere: the model is small, and half-precision LoRA needs loss scaling.
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a broken model directory is one clear line
        raise ModelSourceError(f"cannot load the model in {model_dir}: {one_line(exc)}") from None
    base.config.use_cache = False
    _check_target_modules(base, params.target_modules)
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
        model = get_peft_model(base, config).to(target_device)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        f"LoRA r={params.rank} on {','.join(params.target_modules)}: {trainable:,} trainable of "
        f"{total:,} parameters, {len(train)} train / {len(evals)} eval examples, on {target_device}"
    )

    eval_before = evaluate(model, evals, params.batch_size, pad_id, target_device)
    log.info("eval loss before training: %.4f", eval_before)
    lora = [p for p in model.parameters() if p.requires_grad]  # the adapters' weights
    optimizer = torch.optim.AdamW(lora, lr=params.learning_rate, weight_decay=params.weight_decay)
    # the learning rate decays linearly to zero over the run
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / params.steps)
    batches = endless_batches(train, params.batch_size, params.seed)
    losses: list[float] = []
    model.train()
    train_started = time.perf_counter()
    for step in range(1, params.steps + 1):
        loss_sum, tokens = _token_loss(model, collate(next(batches), pad_id, target_device))
        loss = loss_sum / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, params.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        per_step = (time.perf_counter() - train_started) / step
        log.info("step %d/%d loss %.4f (%.2f s/step)", step, params.steps, losses[-1], per_step)
        if on_step is not None:
            on_step(step, losses[-1])
    train_seconds = time.perf_counter() - train_started
    eval_after = evaluate(model, evals, params.batch_size, pad_id, target_device)
    log.info("eval loss after training: %.4f (before %.4f)", eval_after, eval_before)

    model.save_pretrained(str(adapter_dir))  # peft types the folder as a str
    merged = cast("PreTrainedModel", model.merge_and_unload())  # peft types it as a Module
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
        train_examples=len(train),
        eval_examples=len(evals),
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
    starts = range(0, len(examples), batch_size)
    losses = [
        _token_loss(model, collate(examples[i : i + batch_size], pad_id, device)) for i in starts
    ]
    model.train(was_training)
    return sum(loss.item() for loss, _ in losses) / max(sum(tokens for _, tokens in losses), 1)


def _check_target_modules(model: Any, wanted: tuple[str, ...]) -> None:
    """Raise SettingsError (one line) if a LoRA target module is not a layer of this model."""
    linear = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(wanted) - linear)
    if missing:
        raise SettingsError(
            f"invalid settings: LORA_TARGET_MODULES names {', '.join(missing)}, which this model "
            f"does not have; its linear layers are {', '.join(sorted(linear))}"
        )


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
