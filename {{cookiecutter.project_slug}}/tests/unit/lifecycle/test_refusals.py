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
    remember(published, hf_dir, refused)
    again = refused_before(published, hf_dir, STRICT)
    assert again == refused and again.reasons == ("top-1 agreement 90.0% < 95.0%",)
    assert refused_before(published, hf_dir, Thresholds(min_top1=0.85)) is None  # would pass
    forget(published)
    assert not record_path(published).exists()
    assert refused_before(published, hf_dir, STRICT) is None


def test_a_changed_model_or_a_damaged_record_is_measured_again(model):
    hf_dir, published = model
    published.parent.mkdir()
    remember(published, hf_dir, judge(MEASURED, STRICT))
    weights = hf_dir / "model.safetensors"
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 10**9))
    assert refused_before(published, hf_dir, STRICT) is None
    remember(published, hf_dir, judge(MEASURED, STRICT))
    assert refused_before(published, hf_dir, STRICT) is not None
    record_path(published).write_text('{"measured_on": ')
    assert refused_before(published, hf_dir, STRICT) is None
