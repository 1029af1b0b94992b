"""The quality gate: how far a cheaper engine is from its float32 reference.
{%- if cookiecutter.inference_backend == "ctranslate2" %}

The engine is a converted CTranslate2 model, or the same transformers model computing in a
narrower dtype (`TorchEngine`: bfloat16 on a CPU that has bfloat16 instructions).
{%- else %}

The engine is the same transformers model computing in a narrower dtype (`TorchEngine`:
bfloat16 on a CPU that has bfloat16 instructions).
{%- endif %}

Measured on the evaluation set shipped in the package (evalset/): teacher-forced next-token
top-1 agreement and KL divergence on the reference's own greedy answers, the perplexity ratio
on held-out English, greedy exact-match, and facts (prompts with an expected answer) that the
reference gets right. Exact-match is reported, not gated by default: over 48 tokens it mostly
measures near-ties between two likely tokens, not damage.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from ..messages import parse_request

EVAL_DIR = Path(__file__).resolve().parent / "evalset"  # shipped inside the package


@dataclass(frozen=True)
class Thresholds:
    min_top1: float = 0.95
    max_ppl_ratio: float = 1.02
    max_facts_lost: int = 0
    min_exact_match: float = 0.0

    @classmethod
    def from_settings(cls, settings: Any) -> "Thresholds":
        return cls(
            min_top1=settings.gate_min_top1,
            max_ppl_ratio=settings.gate_max_ppl_ratio,
            max_facts_lost=settings.gate_max_facts_lost,
            min_exact_match=settings.gate_min_exact_match,
        )


@dataclass(frozen=True)
class GateReport:
    scheme: str
    top1: float
    kl: float
    ppl_ratio: float
    exact_match: float
    facts: str  # "kept/reference-correct"
    facts_lost: int
    tokens_per_s: float
    passed: bool
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GateReport":
        return cls(**{**data, "reasons": tuple(data["reasons"])})

    def why(self) -> str:
        return "; ".join(self.reasons) or "all thresholds met"


@dataclass
class EvalSet:
    chats: list[tuple[str, list[dict[str, str]], str | None]]  # id, chat, expected substring
    heldout: list[str]

    @classmethod
    def load(cls, directory: Path) -> "EvalSet":
        chats = []
        for n, line in enumerate((directory / "prompts.jsonl").read_text().splitlines(), 1):
            if line.strip():
                raw = json.loads(line)
                expect = raw.pop("expect", None)
                chats.append((raw.get("id", f"line-{n}"), parse_request(raw).chat(), expect))
        paragraphs = (directory / "heldout.txt").read_text().split("\n\n")
        return cls(chats, [p.strip() for p in paragraphs if p.strip()])


class Reference:
    """The float model in transformers: its greedy answers, computed once per evaluation run."""

    def __init__(self, model_dir: Path, eval_set: EvalSet, max_new_tokens: int = 48) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eval_set = eval_set
        self.max_new_tokens = max_new_tokens
        template = self.tokenizer.apply_chat_template  # typed for any input; str when untokenized
        self.prompts = [
            cast(str, template(chat, tokenize=False, add_generation_prompt=True))
            for _, chat, _ in eval_set.chats
        ]
        self.prompt_ids = [self.encode(p) for p in self.prompts]
        self.answers = self._greedy(self.prompt_ids)
        self.heldout_ids = [self.encode(t) for t in eval_set.heldout]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _greedy(self, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy answers of all prompts in one left-padded batch (equal to one at a time)."""
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        eos = self.tokenizer.eos_token_id
        with self.torch.inference_mode():
            out = self.model.generate(
                **batch, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=eos
            )
        answers = []
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            answers.append(row[: row.index(eos)] if eos in row else row)
        return answers

    def log_probs(self, ids: list[int]) -> np.ndarray:
        """Log-probabilities of every next token; cached, as every scheme is compared with it."""
        key = tuple(ids)
        if key not in self._cache:
            self._cache[key] = self._log_probs(ids)
        return self._cache[key]

    def _log_probs(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            logits = self.model(self.torch.tensor([ids])).logits[0].float()
        return self.torch.log_softmax(logits, dim=-1).numpy()

    def text(self, ids: list[int]) -> str:
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))


def evaluate(
    reference: Reference,
    generator: Any,
    scheme: str,
    thresholds: Thresholds,
    on_step: Callable[[str], None] = lambda step: None,
) -> GateReport:
    """Compare an engine with the reference; return the gate's verdict.

    `generator` is anything with three calls on token strings: `forward_batch`, `score_batch`
    and `generate_batch`{% if cookiecutter.inference_backend == "ctranslate2" %}: a `ctranslate2.Generator` (in `engine.ct2.Banded`) or a `TorchEngine`{% else %} (see `TorchEngine`){% endif %}.
    """
    tok = reference.tokenizer
    agree = total = 0
    kls = []
    on_step(f"{scheme}: teacher-forced agreement")
    for prompt, answer in zip(reference.prompt_ids, reference.answers, strict=True):
        if not answer:
            continue
        full = prompt + answer
        ref = reference.log_probs(full)[len(prompt) - 1 : len(full) - 1]
        logits = np.array(generator.forward_batch([tok.convert_ids_to_tokens(full)]))[0]
        got = _log_softmax(logits[len(prompt) - 1 : len(full) - 1])
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(answer)
        kls.append((np.exp(ref) * (ref - got)).sum(-1))
    on_step(f"{scheme}: held-out perplexity")
    ref_nll = got_nll = 0.0
    count = 0
    for ids in reference.heldout_ids:
        ref = reference.log_probs(ids)
        ref_nll -= float(ref[np.arange(len(ids) - 1), ids[1:]].sum())
        scored = generator.score_batch([tok.convert_ids_to_tokens(ids)])[0]
        got_nll -= float(sum(scored.log_probs))
        count += len(ids) - 1
    on_step(f"{scheme}: greedy answers")
    started = time.perf_counter()
    results = generator.generate_batch(
        [tok.convert_ids_to_tokens(ids) for ids in reference.prompt_ids],
        max_length=reference.max_new_tokens,
        sampling_topk=1,
        include_prompt_in_result=False,
        end_token=[tok.eos_token],
    )
    seconds = time.perf_counter() - started
    answers = [[i for i in r.sequences_ids[0] if i != tok.eos_token_id] for r in results]
    exact = sum(a == r for a, r in zip(answers, reference.answers, strict=True))
    facts_ref = facts_kept = 0
    expected = [expect for _, _, expect in reference.eval_set.chats]
    for expect, ref_ids, ids in zip(expected, reference.answers, answers, strict=True):
        if expect and expect.lower() in reference.text(ref_ids).lower():
            facts_ref += 1
            facts_kept += expect.lower() in reference.text(ids).lower()
    top1 = agree / max(1, total)
    ppl_ratio = math.exp((got_nll - ref_nll) / max(1, count))
    exact_match = exact / len(answers)
    measured = GateReport(
        scheme=scheme,
        top1=round(top1, 4),
        kl=round(float(np.concatenate(kls).mean()) if kls else 0.0, 5),
        ppl_ratio=round(ppl_ratio, 4),
        exact_match=round(exact_match, 4),
        facts=f"{facts_kept}/{facts_ref}",
        facts_lost=facts_ref - facts_kept,
        tokens_per_s=round(sum(len(a) for a in answers) / seconds, 1),
        passed=True,
        reasons=(),
    )
    return judge(measured, thresholds)


def judge(report: GateReport, thresholds: Thresholds) -> GateReport:
    """The report's measurements judged against `thresholds`: a stored measurement can be
    judged again under other thresholds without measuring again."""
    reasons = []
    if report.top1 < thresholds.min_top1:
        reasons.append(f"top-1 agreement {report.top1:.1%} < {thresholds.min_top1:.1%}")
    if report.ppl_ratio > thresholds.max_ppl_ratio:
        ratio, limit = report.ppl_ratio, thresholds.max_ppl_ratio
        reasons.append(f"perplexity ratio {ratio:.3f} > {limit:.3f}")
    if report.facts_lost > thresholds.max_facts_lost:
        reasons.append(f"{report.facts_lost} of {report.facts.split('/')[1]} facts lost")
    if report.exact_match < thresholds.min_exact_match:
        match, limit = report.exact_match, thresholds.min_exact_match
        reasons.append(f"greedy exact-match {match:.1%} < {limit:.1%}")
    return replace(report, passed=not reasons, reasons=tuple(reasons))


class TorchEngine:
    """The reference's model in another torch dtype, behind the three generator calls that
    `evaluate` makes, so one gate judges every engine."""

    def __init__(self, reference: Reference, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.torch = reference.torch
        self.tokenizer = reference.tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(
            reference.model_dir, dtype=getattr(self.torch, dtype)
        ).eval()

    def _ids(self, tokens: list[str]) -> list[int]:
        return cast(list[int], self.tokenizer.convert_tokens_to_ids(tokens))

    def _log_probs(self, ids: list[int]) -> Any:
        with self.torch.inference_mode():
            logits = self.model(self.torch.tensor([ids])).logits[0].float()
        return self.torch.log_softmax(logits, dim=-1)

    def forward_batch(self, batch: list[list[str]]) -> list[np.ndarray]:
        return [self._log_probs(self._ids(tokens)).numpy() for tokens in batch]

    def score_batch(self, batch: list[list[str]]) -> list[Any]:
        scored = []
        for tokens in batch:
            ids = self._ids(tokens)
            log_probs = self._log_probs(ids)[self.torch.arange(len(ids) - 1), ids[1:]]
            scored.append(SimpleNamespace(log_probs=log_probs.tolist()))
        return scored

    def generate_batch(
        self, batch: list[list[str]], max_length: int, **_: Any
    ) -> list[SimpleNamespace]:
        """Greedy answers of the whole batch, left-padded; `evaluate` asks for nothing else."""
        eos = self.tokenizer.eos_token_id
        self.tokenizer.padding_side = "left"
        padded = self.tokenizer.pad(
            {"input_ids": [self._ids(t) for t in batch]}, padding=True, return_tensors="pt"
        )
        with self.torch.inference_mode():
            out = self.model.generate(
                **padded, max_new_tokens=max_length, do_sample=False, pad_token_id=eos
            )
        rows = out[:, padded["input_ids"].shape[1] :].tolist()
        answers = [row[: row.index(eos)] if eos in row else row for row in rows]
        return [SimpleNamespace(sequences_ids=[answer]) for answer in answers]
{%- if cookiecutter.inference_backend == "ctranslate2" %}


def table(reports: list[GateReport]) -> str:
    """A Markdown table of gate reports."""
    lines = [
        "| scheme | top-1 | KL | ppl ratio | exact | facts | tok/s | gate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in reports:
        verdict = "pass" if r.passed else f"FAIL: {r.why()}"
        lines.append(
            f"| {r.scheme} | {r.top1:.1%} | {r.kl:.4f} | {r.ppl_ratio:.3f} | "
            f"{r.exact_match:.0%} | {r.facts} | {r.tokens_per_s:.0f} | {verdict} |"
        )
    return "\n".join(lines)
{%- endif %}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
