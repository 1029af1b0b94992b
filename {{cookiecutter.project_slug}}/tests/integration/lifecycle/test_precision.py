"""`dtype=auto` on this CPU: bfloat16 only after the quality gate passed it, cached; float32
when the gate refuses it."""

import logging

import pytest

from {{ cookiecutter.package_name }}.engine.service import InferenceService
from {{ cookiecutter.package_name }}.lifecycle import precision
from {{ cookiecutter.package_name }}.lifecycle.loading import load_backend

# bf16_cpu: deselected, with the reason printed, on a CPU without bfloat16 instructions
# (tests/conftest.py); there `auto` is float32 with no gate, as the unit tests show.
pytestmark = [pytest.mark.integration, pytest.mark.bf16_cpu]


@pytest.fixture(scope="module")
def auto(settings):
    return settings.model_copy(update={"backend": "transformers", "dtype": "auto", "device": "cpu"})


# Thresholds that any measurement passes, and one that none does (top-1 agreement of 100%):
# they judge the measurement stored by the first test, so these tests prove the mechanism on any
# CPU with bfloat16, whatever the gate concludes on this one.
LENIENT = {"gate_min_top1": 0.0, "gate_max_ppl_ratio": 100.0, "gate_max_facts_lost": 100}
STRICT = {"gate_min_top1": 1.0}


def test_auto_follows_the_gates_verdict_measured_once(auto, model_dir, monkeypatch):
    verdict = precision.gate(auto, model_dir, "bfloat16")
    assert precision.verdict_file(auto, model_dir, "bfloat16").is_file()
    assert 0.5 < verdict.top1 <= 1.0 and verdict.ppl_ratio > 0.9, verdict
    assert verdict.passed == (verdict.reasons == ())
    expected = "bfloat16" if verdict.passed else "float32"
    # The verdict is cached: asking again loads no reference model.
    monkeypatch.setattr(precision, "Reference", None)
    assert precision.resolve_dtype(auto, model_dir, "cpu") == expected


def test_a_passed_gate_serves_bfloat16(auto, model_dir, monkeypatch):
    precision.gate(auto, model_dir, "bfloat16")  # measured (or found) under the defaults
    monkeypatch.setattr(precision, "Reference", None)  # judged again, not measured again
    lenient = auto.model_copy(update=LENIENT)
    assert precision.resolve_dtype(lenient, model_dir, "cpu") == "bfloat16"
    backend = load_backend(lenient)
    assert backend.describe()["compute_type"] == "bfloat16"
    service = InferenceService.from_settings(lenient, backend)
    raw = {"id": "fr", "prompt": "What is the capital of France?", "max_new_tokens": 16}
    reply = service.run([service.admit(raw, "fr")])[0]
    assert reply.error is None and reply.usage.completion_tokens > 0


def test_a_refused_bfloat16_falls_back_to_float32_with_one_warning(
    auto, model_dir, monkeypatch, caplog
):
    precision.gate(auto, model_dir, "bfloat16")
    monkeypatch.setattr(precision, "Reference", None)
    strict = auto.model_copy(update=STRICT)
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert precision.resolve_dtype(strict, model_dir, "cpu") == "float32"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "bfloat16 refused by the quality gate (top-1 agreement" in warning
    assert "< 100.0%" in warning
    assert warning.endswith(": serving float32")
