"""CTranslate2 engine: `Generator.generate_batch` on a converted (and maybe quantized) model.

Imports neither torch nor transformers: tokenization is `tokenizers` alone (ChatTokenizer).
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np

from ..errors import ModelSourceError
from ..settings import SettingsError
from .backend import (
    Completion,
    OnIndexToken,
    cut_at_stop,
    generate_grouped,
    sampling_groups,
    stop_in_tail,
)
from .cores import available_cores, default_threads
from .prompts import GenerationParams, PreparedRequest
from .streaming import Scheduler
from .tokenizer import ChatTokenizer
from .waves import WaveScheduler

log = logging.getLogger(__name__)
META_FILE = "model_meta.json"  # written by `convert`: source, quantization, context window, gate


def thread_split(
    inter_threads: int, intra_threads: int, cores: int | None = None
) -> tuple[int, int]:
    """(inter, intra) threads whose product is at most the cores; intra 0 = the cores left.

    Raises SettingsError when the product asked for is over the cores: oversubscribed threads
    make CTranslate2 slower, not faster.
    """
    threads = cores or default_threads()  # OMP_NUM_THREADS, where it asks for fewer
    cores = cores or available_cores()
    intra = intra_threads or max(1, threads // inter_threads)
    if inter_threads * intra > cores:
        raise SettingsError(
            f"invalid settings: INTER_THREADS={inter_threads} x INTRA_THREADS={intra} is over "
            f"the {cores} cores of this machine"
        )
    return inter_threads, intra


class CTranslate2Backend:
    name = "ctranslate2"
    streams = True  # `generate` takes on_token: CTranslate2 calls back for each decoded token

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        compute_type: str = "default",
        inter_threads: int = 1,
        intra_threads: int = 0,
        max_batch_tokens: int = 16384,
    ) -> None:
        if not (model_dir / "model.bin").is_file():
            raise ModelSourceError(f"{model_dir} is not a CTranslate2 model (no model.bin)")
        gpus = ctranslate2.get_cuda_device_count()
        use_cuda = device == "cuda" or (device == "auto" and gpus > 0)
        if device == "cuda" and gpus == 0:
            raise ModelSourceError("device=cuda was asked for but CTranslate2 sees no CUDA device")
        inter, intra = thread_split(inter_threads, intra_threads)
        self.device = "cuda" if use_cuda else "cpu"
        try:
            self.generator = ctranslate2.Generator(
                str(model_dir),
                device=self.device,
                compute_type=compute_type,
                inter_threads=inter,
                intra_threads=intra,
            )
        except (ValueError, RuntimeError) as exc:  # e.g. float16 asked for on a CPU
            raise ModelSourceError(f"cannot load {model_dir} with {compute_type}: {exc}") from None
        self.tokenizer = ChatTokenizer(model_dir)
        meta_file = model_dir / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.context_window = int(meta.get("context_window", 2048))
        self.end_tokens = [self.tokenizer.eos_token] if self.tokenizer.eos_token else []
        self.max_batch_tokens = max_batch_tokens
        self.model_dir = model_dir
        self.threads = f"{inter}x{intra}"
        self.lanes = inter  # batches that decode at once, each on `intra` threads
        log.info(
            "ctranslate2 backend on %s, compute type %s, threads %dx%d",
            self.device, self.generator.compute_type, inter, intra,
        )  # fmt: skip

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "engine_device": self.device,
            "compute_type": self.generator.compute_type,
            "engine_threads": self.threads,
            "model_dir": str(self.model_dir),
        }

    def continuous(
        self,
        max_batch_size: int,
        max_batch_tokens: int,
        packed_rows: int = 0,
        max_wait_s: float = 0.0,
        attention_kernel: bool = True,
    ) -> Scheduler[Any]:
        """Overlapping batches on this engine's INTER_THREADS lanes (engine/waves.py): the
        closest CTranslate2 allows to continuous batching. `packed_rows` and
        `attention_kernel` are unused here."""
        return WaveScheduler(self, self.lanes, max_batch_size, max_batch_tokens, max_wait_s)

    def generate(
        self, batch: list[PreparedRequest], on_token: OnIndexToken | None = None
    ) -> list[Completion]:
        """One completion per request, in order; requests sharing sampling settings and close
        prompt lengths (`_bands`) share a call.

        `on_token(index, token_id)` hears each token as it is decoded; True stops that request.
        """
        return generate_grouped(batch, self._generate_group, on_token, _bands)

    def _generate_group(
        self, group: list[PreparedRequest], on_token: OnIndexToken | None
    ) -> list[Completion]:
        params = group[0].params
        if not params.greedy and params.seed is not None:  # sampling_groups: it is alone
            return [self._sample_seeded(group[0], on_token)]
        new_tokens = max(r.params.max_new_tokens for r in group)
        callback = None if on_token is None else _heard(group, on_token)
        results = self.generator.generate_batch(
            [self.tokenizer.convert_ids_to_tokens(r.token_ids) for r in group],
            max_length=new_tokens,
            max_batch_size=self.max_batch_tokens,
            batch_type="tokens",
            include_prompt_in_result=False,
            end_token=self.end_tokens,
            callback=callback,
            **_sampling(params),
        )
        return [
            self._completion(request, result.sequences_ids[0])
            for request, result in zip(group, results, strict=True)
        ]

    def _sample_seeded(
        self, request: PreparedRequest, on_token: OnIndexToken | None = None
    ) -> Completion:
        """Sample step by step from the model's logits with a generator seeded by the request.

        CTranslate2 seeds one random generator per thread, once, so `set_random_seed` cannot
        make one request reproducible; this path can, at the cost of one forward per token.
        """
        params = request.params
        rng = np.random.default_rng(params.seed)
        ids, new = list(request.token_ids), []
        for _ in range(params.max_new_tokens):
            tokens = [self.tokenizer.convert_ids_to_tokens(ids)]
            logits = np.asarray(self.generator.forward_batch(tokens))[0, -1].astype(np.float64)
            token = _sample(logits, params.temperature, params.top_p, rng)
            new.append(token)
            if token == self.tokenizer.eos_token_id or (on_token and on_token(0, token)):
                break
            ids.append(token)
            if stop_in_tail(self.tokenizer, new, params.stop):
                break
        return self._completion(request, new)

    def _completion(self, request: PreparedRequest, new_ids: list[int]) -> Completion:
        limit = request.params.max_new_tokens
        ids = [i for i in new_ids[:limit] if i != self.tokenizer.eos_token_id]
        text, stopped = cut_at_stop(self.tokenizer.decode(ids), request.params.stop)
        if stopped:
            ids = self.tokenizer(text)["input_ids"]
        eos = self.tokenizer.eos_token_id
        ended = len(new_ids) < limit or eos in new_ids[:limit] or stopped
        return Completion(
            text=text,
            finish_reason="stop" if ended else "length",
            prompt_tokens=len(request.token_ids),
            completion_tokens=len(ids),
        )


def length_bands(lengths: list[int], new_tokens: int) -> list[list[int]]:
    """The indices of prompts of these lengths in bands that share a `generate_batch` call:
    CTranslate2 forwards a batch's prompts at once only up to its shortest one, and feeds the
    rest of each longer prompt a token per decoding step (OpenNMT/CTranslate2#1480); on one
    thread, a 37-token and a 217-token prompt with 8 new tokens took 10 s together and 1.6 s
    apart. A band's lengths differ by less than the tokens it decodes: a wider band feeds more
    prompt tokens step by step than a call of its own would decode. Bands keep the order of
    their first prompt (first come, first served), and each prompt its order in its band."""
    bands: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if bands and lengths[index] - lengths[bands[-1][0]] < max(new_tokens, 1):
            bands[-1].append(index)  # the band's first index is its shortest prompt's
        else:
            bands.append([index])
    return sorted((sorted(band) for band in bands), key=lambda band: band[0])


def _bands(batch: list[PreparedRequest]) -> list[list[int]]:
    """The requests that share a call: each sampling group split in its `length_bands`."""
    return [
        [group[i] for i in band]
        for group in sampling_groups(batch)
        for band in length_bands(
            [len(batch[j].token_ids) for j in group],
            max(batch[j].params.max_new_tokens for j in group),
        )
    ]


class Banded:
    """A `ctranslate2.Generator` whose `generate_batch` runs its prompts in `length_bands`, a
    call each, the results in the prompts' order (for the quality gate's greedy answers: the
    evaluation prompts' lengths differ); its other calls are the generator's own."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def generate_batch(self, prompts: list[list[str]], max_length: int, **kwargs: Any) -> list:
        if kwargs.get("callback") is not None:
            raise ValueError("Banded.generate_batch: a callback would hear rows by band")
        results: dict[int, Any] = {}
        for band in length_bands([len(p) for p in prompts], max_length):
            batch = [prompts[i] for i in band]
            out = self.generator.generate_batch(batch, max_length=max_length, **kwargs)
            results.update(zip(band, out, strict=True))
        return [results[i] for i in range(len(prompts))]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)


def _heard(group: list[PreparedRequest], on_token: OnIndexToken) -> Callable[[Any], bool]:
    """CTranslate2's per-token callback: each row's tokens go to `on_token` up to the row's own
    max_new_tokens (the group decodes up to the largest), where decoding stops for that row."""
    counts = [0] * len(group)

    def callback(step: Any) -> bool:
        row = step.batch_id
        counts[row] += 1
        limit = group[row].params.max_new_tokens
        if counts[row] > limit:
            return True
        return bool(on_token(row, step.token_id)) or counts[row] >= limit

    return callback


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from softmax(logits / temperature), restricted to the top_p nucleus."""
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


def _sampling(params: GenerationParams) -> dict[str, float | int]:
    if params.greedy:
        return {"sampling_topk": 1}
    # topk 0 samples from the whole distribution, as transformers does with top_k=0.
    return {
        "sampling_topk": 0,
        "sampling_temperature": params.temperature,
        "sampling_topp": params.top_p,
    }
