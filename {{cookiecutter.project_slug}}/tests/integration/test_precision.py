"""`dtype=auto` on this CPU: bfloat16 only after the quality gate passed it, cached; float32
when the gate refuses it."""

import logging

import pytest

from {{ cookiecutter.package_name }} import precision
from {{ cookiecutter.package_name }}.backends import load_backend
from {{ cookiecutter.package_name }}.service import InferenceService

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not precision.cpu_has_bf16(),
        reason="this CPU has no bfloat16 instructions: auto is float32 here, with no gate",
    ),
]


@pytest.fixture(scope="module")
def auto(settings):
    return settings.model_copy(update={"backend": "transformers", "dtype": "auto", "device": "cpu"})


def test_auto_serves_bfloat16_once_the_gate_passed_it(auto, model_dir, monkeypatch):
    assert precision.resolve_dtype(auto, model_dir, "cpu") == "bfloat16"
    verdict = precision.gate(auto, model_dir, "bfloat16")
    assert verdict.passed and verdict.top1 >= auto.gate_min_top1, verdict
    assert precision.verdict_file(auto, model_dir, "bfloat16").is_file()
    # The verdict is cached: asking again loads no reference model.
    monkeypatch.setattr(precision, "Reference", None)
    assert precision.resolve_dtype(auto, model_dir, "cpu") == "bfloat16"

    backend = load_backend(auto)
    assert backend.describe()["compute_type"] == "bfloat16"
    service = InferenceService.from_settings(auto, backend)
    raw = {"id": "fr", "prompt": "What is the capital of France?"}
    reply = service.run([service.admit(raw, "fr")])[0]
    assert reply.error is None and "Paris" in reply.text


def test_a_refused_bfloat16_falls_back_to_float32_with_one_warning(
    auto, model_dir, monkeypatch, caplog
):
    precision.gate(auto, model_dir, "bfloat16")  # measured (or found) under the defaults
    # A stricter threshold judges the stored measurements again: nothing is measured twice.
    monkeypatch.setattr(precision, "Reference", None)
    strict = auto.model_copy(update={"gate_min_top1": 1.0})
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert precision.resolve_dtype(strict, model_dir, "cpu") == "float32"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "bfloat16 refused by the quality gate (top-1 agreement" in warning
    assert "< 100.0%" in warning
    assert precision.resolve_dtype(auto, model_dir, "cpu") == "bfloat16"
