"""CTranslate2 on the real bundled model: conversion, the quality gate, parity and no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.engine.ct2 import (
    META_FILE,
    Banded,
    CTranslate2Backend,
)
from {{ cookiecutter.package_name }}.engine.hf import TransformersBackend
from {{ cookiecutter.package_name }}.engine.service import Admitted, InferenceService
from {{ cookiecutter.package_name }}.lifecycle.quality import EvalSet
from {{ cookiecutter.package_name }}.lifecycle.quantize import (
    EVAL_DIR,
    find_published,
    published_dir,
)
from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

pytestmark = pytest.mark.integration
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def float32(settings, model_dir) -> Path:
    """The bundled model converted to CTranslate2 float32, gated and published."""
    float_settings = settings.model_copy(update={"quantization": "float32"})
    if find_published(float_settings) is None:
        result = cli("convert", "--quantization", "float32")
        assert result.returncode == 0, result.stderr
    return published_dir(float_settings, "float32")


def test_float32_passes_the_gate_with_its_report_published(float32):
    meta = json.loads((float32 / META_FILE).read_text())
    assert meta["quantization"] == "float32" and not meta["forced"]
    assert meta["gate"]["passed"] is True
    assert meta["gate"]["top1"] >= 0.99 and meta["gate"]["ppl_ratio"] <= 1.005
    # The gate's greedy answers (48 tokens, all 32 evaluation prompts) equal the reference's.
    assert meta["gate"]["exact_match"] == 1.0
    assert meta["context_window"] == 8192


def test_float32_greedy_equals_transformers_greedy_on_the_eval_prompts(
    settings, model_dir, float32
):
    """Through the service (the torch-free tokenizer's chat template, batching, decoding) on
    8 of the prompts; the gate compares the engines' greedy answers on all 32."""
    chats = EvalSet.load(EVAL_DIR).chats[:8]
    requests = [{"id": cid, "messages": chat, "max_new_tokens": 48} for cid, chat, _ in chats]
    engines = [TransformersBackend(model_dir), CTranslate2Backend(float32, compute_type="float32")]
    answers = {}
    for engine in engines:
        service = InferenceService.from_settings(settings, engine)
        admitted = [service.admit(r, r["id"]) for r in requests]
        assert all(isinstance(a, Admitted) for a in admitted)
        answers[engine.name] = {reply.id: reply.text for reply in service.run(admitted)}
    assert len(answers["ctranslate2"]) == 8
    differ = {i: (t, answers["ctranslate2"][i]) for i, t in answers["transformers"].items()}
    assert {i: pair for i, pair in differ.items() if pair[0] != pair[1]} == {}


def test_a_degraded_quantization_is_refused_with_one_clear_line(settings):
    int8 = published_dir(settings.model_copy(update={"quantization": "int8"}), "int8")
    # Measured once (here, or by an earlier `auto` in this cache), then remembered.
    first = cli("convert", "--quantization", "int8")
    for result in (first, again := cli("convert", "--quantization", "int8")):
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: int8 failed the quality gate (top-1 agreement")
        assert "Traceback" not in result.stderr
        assert "| int8 |" in result.stdout and "FAIL" in result.stdout  # the table is printed
    assert "refused by the quality gate earlier" in again.stderr
    assert "converting" not in again.stderr
    assert not int8.exists()


def test_the_int8_diagnosis_script_prints_agreement_per_step_and_layer_group(model_dir):
    result = subprocess.run(
        [sys.executable, "scripts/diagnose_int8.py", "--prompts", "4"],
        capture_output=True, text=True,
        timeout=900, cwd=PROJECT_ROOT, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "On 4 of the 32 evaluation prompts:" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[:2] == ["| int8 simulated on | top-1 agreement |", "| --- | --- |"]
    # all layers three ways (weights and activations, weights, activations), then 4 groups
    assert len(rows) == 2 + 3 + 4, result.stdout
    assert "| all layers: int8 weights only |" in result.stdout
    assert "| down_proj only: weights and activations |" in result.stdout
    for row in rows[2:]:
        assert 0.0 <= float(row.split("|")[2].strip().removesuffix("%")) <= 100.0, row


class _Spy:
    """The real generator, its `generate_batch` calls' prompt lengths recorded."""

    def __init__(self, generator) -> None:
        self.generator, self.calls = generator, []

    def generate_batch(self, prompts, **kwargs):
        self.calls.append([len(p) for p in prompts])
        return self.generator.generate_batch(prompts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.generator, name)


def test_prompts_of_far_apart_lengths_decode_in_separate_calls_with_their_texts_alone(
    settings, float32
):
    """CTranslate2 feeds the part of a prompt past the batch's shortest one token per step:
    prompts whose lengths differ by the new tokens or more go in calls of their own, in order,
    each text (and each streamed token, by its request's index) as it is alone."""
    engine = CTranslate2Backend(float32, compute_type="float32")
    engine.generator = spy = _Spy(engine.generator)
    service = InferenceService.from_settings(settings, engine)
    story = "Tell me a story about a lighthouse keeper. " * 8
    prompts = ["What is the capital of France?", story, "Name a red fruit.", story + "Go on."]
    admitted = [
        service.admit({"id": str(i), "prompt": p, "max_new_tokens": 6, "temperature": 0.0}, "x")
        for i, p in enumerate(prompts)
    ]
    assert all(isinstance(a, Admitted) for a in admitted)
    heard: dict[int, list[int]] = {}
    together = service.run(admitted, lambda i, token: heard.setdefault(i, []).append(token))
    lengths = [len(a.request.token_ids) for a in admitted]
    assert spy.calls == [[lengths[0], lengths[2]], [lengths[1], lengths[3]]]
    spy.calls.clear()
    for i, (a, reply) in enumerate(zip(admitted, together, strict=True)):
        alone = service.run([a])[0]
        assert reply.text == alone.text and reply.error is None
        assert reply.usage.completion_tokens <= len(heard[i]) <= 6  # an end token is heard too
    assert spy.calls == [[n] for n in lengths]
    # The quality gate's greedy answers: the same bands, the results in the prompts' order.
    spy.calls.clear()
    tokens = [engine.tokenizer.convert_ids_to_tokens(a.request.token_ids) for a in admitted]
    options = {"max_length": 6, "sampling_topk": 1, "include_prompt_in_result": False}
    banded = Banded(spy).generate_batch(tokens, **options)
    assert spy.calls == [[lengths[0], lengths[2]], [lengths[1], lengths[3]]]
    alone = [spy.generator.generate_batch([one], **options)[0] for one in tokens]
    assert [r.sequences_ids for r in banded] == [r.sequences_ids for r in alone]
    with pytest.raises(ValueError, match="callback"):
        Banded(spy).generate_batch(tokens, callback=print, **options)


def test_a_request_starts_on_a_free_lane_while_a_batch_decodes(settings, float32):
    """Two lanes (INTER_THREADS=2, a core each): a short request sent while a long one decodes
    starts at once and ends first, and each text is the one it gets alone (greedy)."""
    engine = CTranslate2Backend(float32, compute_type="float32", inter_threads=2, intra_threads=1)
    service = InferenceService.from_settings(settings, engine)
    scheduler = service.continuous(
        settings.model_copy(update={"scheduling": "continuous", "max_wait_ms": 0.0})
    )
    assert scheduler is not None
    raw = {
        "long": {"prompt": "Tell a long story about a dragon and a knight.", "max_new_tokens": 64},
        "short": {"prompt": "What is the capital of France?", "max_new_tokens": 6},
    }
    admitted = {
        name: service.admit({"id": name, **r, "temperature": 0.0}, name) for name, r in raw.items()
    }
    assert all(isinstance(a, Admitted) for a in admitted.values())
    heard: list[str] = []
    scheduler.on_token = lambda tag, token: heard.append(tag) is not None
    scheduler.add(admitted["long"].request, "long")
    order = []
    while "long" not in heard and len(scheduler):  # until the long one decodes
        order += scheduler.step()
    assert order == [], "the long request ended before its first token was heard"
    scheduler.add(admitted["short"].request, "short")
    while len(scheduler):
        order += scheduler.step()
    assert [tag for tag, _ in order] == ["short", "long"]
    assert heard.index("short") < len(heard) - 1 - heard[::-1].index("long")  # interleaved
    for tag, result in order:
        alone = service.run([admitted[tag]])[0]
        assert result.text == alone.text
        assert result.completion_tokens == alone.usage.completion_tokens


def test_convert_is_idempotent(float32):
    # Once in this session first: a cache warm from an earlier run holds the files, not this
    # session's tracking store, so the fixture's shortcut may not have published here.
    first = cli("convert", "--quantization", "float32")
    assert first.returncode == 0, first.stderr
    before = (float32 / "model.bin").stat().st_mtime_ns
    result = cli("convert", "--quantization", "float32")
    assert result.returncode == 0, result.stderr
    assert "already published" in result.stderr
    assert (float32 / "model.bin").stat().st_mtime_ns == before


def test_the_serving_process_never_imports_torch(float32):
    script = (
        "import json, resource, sys\n"
        "from {{ cookiecutter.package_name }}.lifecycle.loading import load_backend\n"
        "from {{ cookiecutter.package_name }}.engine.service import InferenceService\n"
        "from {{ cookiecutter.package_name }}.settings import load_settings\n"
        "settings = load_settings(backend='ctranslate2', quantization='float32')\n"
        "service = InferenceService.from_settings(settings, load_backend(settings))\n"
        "request = {'id': 'q', 'prompt': 'What is the capital of France?'}\n"
        "reply = service.run([service.admit(request, 'q')])[0]\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'text': reply.text, 'torch': 'torch' in sys.modules,\n"
        "    'transformers': 'transformers' in sys.modules, 'rss_mib': round(rss)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        cwd=PROJECT_ROOT, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in seen["text"]
    assert seen["torch"] is False and seen["transformers"] is False
    print(f"ctranslate2 serving process: {seen['rss_mib']} MiB peak RSS without torch")


def test_the_main_job_runs_on_ctranslate2(tmp_path, float32):
    env = {f"{ENV_PREFIX}BACKEND": "ctranslate2", f"{ENV_PREFIX}QUANTIZATION": "float32"}
    out = str(tmp_path / "out.jsonl")
    result = cli("batch", "data/sample_prompts.jsonl", out, "--show", env=env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "inputs/s" in result.stdout
    assert "compute type float32" in result.stderr
