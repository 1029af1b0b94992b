"""A scheme the quality gate refused is not measured again while the measurement would be the
same and the thresholds would still refuse it."""

import os

import pytest

from {{ cookiecutter.package_name }}.lifecycle.quality import GateReport, Thresholds, judge
from {{ cookiecutter.package_name }}.lifecycle.refusals import (
    forget,
    record_path,
    refused_before,
    remember,
)

STRICT = Thresholds()
MEASURED = GateReport(
    scheme="int8", top1=0.9, kl=0.02, ppl_ratio=1.01, exact_match=0.5, facts="4/4",
    facts_lost=0, tokens_per_s=80.0, passed=True, reasons=(),
)  # fmt: skip


@pytest.fixture
def model(tmp_path):
    hf_dir = tmp_path / "model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"weights")
    return hf_dir, tmp_path / "ct2" / "model-int8"


def test_a_refusal_is_remembered_and_judged_again_under_the_thresholds_of_the_call(model):
    hf_dir, published = model
    published.parent.mkdir()
    refused = judge(MEASURED, STRICT)
    assert not refused.passed
    remember(published, hf_dir, "cpu", refused)
    again = refused_before(published, hf_dir, "cpu", STRICT)
    assert again == refused and again.reasons == ("top-1 agreement 90.0% < 95.0%",)
    assert refused_before(published, hf_dir, "cpu", Thresholds(min_top1=0.85)) is None  # passes
    assert refused_before(published, hf_dir, "cuda", STRICT) is None  # measured elsewhere
    forget(published)
    assert not record_path(published).exists()
    assert refused_before(published, hf_dir, "cpu", STRICT) is None


def test_a_changed_model_or_a_damaged_record_is_measured_again(model):
    hf_dir, published = model
    published.parent.mkdir()
    remember(published, hf_dir, "cpu", judge(MEASURED, STRICT))
    weights = hf_dir / "model.safetensors"
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 10**9))
    assert refused_before(published, hf_dir, "cpu", STRICT) is None
    remember(published, hf_dir, "cpu", judge(MEASURED, STRICT))
    assert refused_before(published, hf_dir, "cpu", STRICT) is not None
    before = weights.stat()
    weights.write_bytes(b"weightz")  # same size, mtime put back: only the change time tells
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert refused_before(published, hf_dir, "cpu", STRICT) is None
    remember(published, hf_dir, "cpu", judge(MEASURED, STRICT))
    record_path(published).write_text('{"measured_on": ')
    assert refused_before(published, hf_dir, "cpu", STRICT) is None


def test_another_library_version_is_measured_again(model, monkeypatch):
    from {{ cookiecutter.package_name }}.lifecycle import refusals

    hf_dir, published = model
    published.parent.mkdir()
    remember(published, hf_dir, "cpu", judge(MEASURED, STRICT))
    real = refusals.version
    older_torch = lambda name: "0.0.1" if name == "torch" else real(name)  # noqa: E731
    monkeypatch.setattr(refusals, "version", older_torch)
    assert refused_before(published, hf_dir, "cpu", STRICT) is None
