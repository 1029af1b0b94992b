"""Hugging Face transformers engine: `generate` on left-padded batches with attention masks."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ..errors import ModelSourceError
from .backend import Completion, cut_at_stop, generate_grouped, stop_in_tail
from .cores import default_threads
from .prompts import GenerationParams, PreparedRequest

if TYPE_CHECKING:
    from .continuous import ContinuousBatcher

log = logging.getLogger(__name__)
DEFAULT_CONTEXT_WINDOW = 2048


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("device=cuda was asked for but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # precision.resolve_dtype decides when bfloat16 is worth it on a CPU


class TransformersBackend:
    name = "transformers"

    def __init__(
        self, model_dir: Path, device: str = "auto", dtype: str = "auto", num_threads: int = 0
    ) -> None:
        torch.set_num_threads(num_threads or default_threads())
        self.device = pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=pick_dtype(dtype, self.device)
            )
        except Exception as exc:  # noqa: BLE001 - a broken model directory is one clear line
            raise ModelSourceError(f"cannot load the model in {model_dir}: {exc}") from None
        # transformers wraps `to` with functools.wraps, whose type drops the bound self
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.model_dir = model_dir
        # Left padding keeps every prompt's last token at the end, where generation continues.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_window = int(
            getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT_WINDOW
        )
        self.eos_ids = _eos_ids(model, self.tokenizer)
        log.info("transformers backend on %s, dtype %s", self.device, model.dtype)

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "engine_device": str(self.device),
            "compute_type": str(self.model.dtype).removeprefix("torch."),
            "engine_threads": str(torch.get_num_threads()),
            "model_dir": str(self.model_dir),
        }

    def generate(self, batch: list[PreparedRequest]) -> list[Completion]:
        """One completion per request, in order; requests sharing sampling settings share a pass."""
        return generate_grouped(batch, self._generate_group)

    def continuous(
        self,
        max_batch_size: int,
        max_batch_tokens: int,
        packed_rows: int = 0,
        max_wait_s: float = 0.0,
        attention_kernel: bool = True,
    ) -> "ContinuousBatcher | None":
        """A scheduler whose requests join and leave the batch between decode steps; None for
        a model whose KV cache the batcher's slab cannot hold (sliding-window or linear
        attention layers): it is served in static batches. `max_wait_s` is unused: a request
        joins at the next step, so nothing waits for company."""
        from .continuous import ContinuousBatcher
        from .kv_cache import supports_slab

        if not supports_slab(self.model.config):
            log.warning("this model has layers continuous batching cannot hold: static batches")
            return None
        return ContinuousBatcher(
            self, max_batch_size, max_batch_tokens, packed_rows, attention_kernel
        )

    @torch.inference_mode()
    def _generate_group(
        self, group: list[PreparedRequest], on_token: object = None
    ) -> list[Completion]:  # tokens stream through `continuous`, not here
        params = group[0].params
        padded = self.tokenizer.pad(
            {"input_ids": [r.token_ids for r in group]}, padding=True, return_tensors="pt"
        ).to(self.device)
        prompt_len = padded["input_ids"].shape[1]
        limits = [r.params.max_new_tokens for r in group]
        config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=not params.greedy,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
            **(
                {}
                if params.greedy
                else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
            ),
        )
        if not params.greedy and params.seed is not None:
            torch.manual_seed(params.seed)  # also seeds every CUDA device
        stopping = StoppingCriteriaList([_RowStop(group, prompt_len, self.tokenizer)])
        output = self.model.generate(**padded, generation_config=config, stopping_criteria=stopping)
        return [
            self.completion(request, output[row, prompt_len:].tolist()[:limit])
            for row, (request, limit) in enumerate(zip(group, limits, strict=True))
        ]

    def completion(self, request: PreparedRequest, new_ids: list[int]) -> Completion:
        """The completion of `request` from its generated ids: cut at eos or a stop string."""
        ended = next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        ids = new_ids if ended is None else new_ids[:ended]
        decoded = self.tokenizer.decode(ids, skip_special_tokens=True)  # one sequence: a str
        text, stopped = cut_at_stop(cast(str, decoded), request.params.stop)
        if stopped:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Completion(
            text=text,
            finish_reason="stop" if ended is not None or stopped else "length",
            prompt_tokens=len(request.token_ids),
            completion_tokens=len(ids),
        )


class _RowStop(StoppingCriteria):
    """Marks a row done at its own max_new_tokens or stop string, so short rows stop early."""

    def __init__(self, group: list[PreparedRequest], prompt_len: int, tokenizer: Any) -> None:
        self.limits = [r.params.max_new_tokens for r in group]
        self.stops = [r.params.stop for r in group]
        self.prompt_len = prompt_len
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        done = [generated >= limit for limit in self.limits]
        for row, stops in enumerate(self.stops):
            if stops and not done[row]:
                generated_ids = input_ids[row, self.prompt_len :].tolist()
                done[row] = stop_in_tail(self.tokenizer, generated_ids, stops)
        # StoppingCriteria promises the legacy BoolTensor class; torch.tensor is typed Tensor.
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def generate_with_pipeline(
    model_dir: Path, chat: list[dict[str, str]], params: GenerationParams
) -> str:
    """The quick path: `transformers.pipeline("text-generation")` on one chat, for comparison."""
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(model_dir), device=pick_device("auto"))
    sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p}
    if not params.greedy and params.seed is not None:
        torch.manual_seed(params.seed)
    result = generator(
        chat, max_new_tokens=params.max_new_tokens, do_sample=not params.greedy, **sampling
    )
    text = result[0]["generated_text"][-1]["content"]
    return cut_at_stop(text, params.stop)[0]
