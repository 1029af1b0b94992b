"""LoRA fine-tuning: chat data (`data`), training and merging (`train`), and the tracked job that
registers and promotes the result (`pipeline`). The public names of all three are here."""

from ...lifecycle.finetune.data import (
    IGNORE,
    ChatDataset,
    DatasetError,
    TokenizedExample,
    as_chat_dataset,
    collate,
    endless_batches,
    load_chat_dataset,
    load_tokenizer,
    read_chats,
    tokenize_chat,
)
from ...lifecycle.finetune.pipeline import FinetuneOutcome, lora_params, run_finetune
from ...lifecycle.finetune.train import LoraParams, TrainResult, evaluate, train_lora

__all__ = [
    "IGNORE",
    "ChatDataset",
    "DatasetError",
    "FinetuneOutcome",
    "LoraParams",
    "TokenizedExample",
    "TrainResult",
    "as_chat_dataset",
    "collate",
    "endless_batches",
    "evaluate",
    "load_chat_dataset",
    "load_tokenizer",
    "lora_params",
    "read_chats",
    "run_finetune",
    "tokenize_chat",
    "train_lora",
]
