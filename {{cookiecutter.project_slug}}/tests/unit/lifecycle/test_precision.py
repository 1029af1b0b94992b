"""Which dtype `auto` means on a CPU: pure logic, no model (the gate itself is an integration
test)."""

from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.lifecycle import precision
from {{ cookiecutter.package_name }}.settings import Settings

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16
"""
OLD_X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert "avx512_bf16" in precision.cpu_flags(X86)
    assert "bf16" in precision.cpu_flags(ARM)
    assert precision.cpu_flags("") == set()


@pytest.mark.parametrize(("cpuinfo", "native"), [(X86, True), (ARM, True), (OLD_X86, False)])
def test_only_cpus_with_bfloat16_instructions_count(cpuinfo, native):
    assert precision.cpu_has_bf16(precision.cpu_flags(cpuinfo)) is native


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_taken_as_given_without_a_gate(dtype, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "gate", _no_gate)
    settings = Settings(dtype=dtype, cache_dir=tmp_path)
    assert precision.resolve_dtype(settings, tmp_path, "cpu") == dtype


def test_auto_is_float32_on_a_cpu_without_bfloat16_and_runs_no_gate(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(precision, "gate", _no_gate)
    settings = Settings(dtype="auto", cache_dir=tmp_path)
    assert precision.resolve_dtype(settings, tmp_path, "cpu") == "float32"


def test_verdicts_are_kept_per_model_directory_and_dtype(tmp_path):
    settings = Settings(cache_dir=tmp_path)
    a, b = tmp_path / "one" / "model", tmp_path / "two" / "model"
    files = {precision.verdict_file(settings, d, t) for d in (a, b) for t in ("bfloat16", "x")}
    assert len(files) == 4
    assert all(f.parent == tmp_path / "gates" for f in files)


def _no_gate(settings: Settings, model_dir: Path, dtype: str):
    raise AssertionError("the gate ran")


def test_stored_measurements_are_judged_by_the_current_thresholds():
    from {{ cookiecutter.package_name }}.lifecycle.quality import (
        GateReport,
        Thresholds,
        judge,
    )

    measured = GateReport(
        scheme="bfloat16", top1=0.985, kl=0.001, ppl_ratio=1.0, exact_match=0.5, facts="4/4",
        facts_lost=0, tokens_per_s=150.0, passed=False, reasons=("stale",),
    )  # fmt: skip
    assert judge(measured, Thresholds()).passed
    strict = judge(measured, Thresholds(min_top1=0.99, min_exact_match=0.6))
    assert not strict.passed
    assert strict.reasons == ("top-1 agreement 98.5% < 99.0%", "greedy exact-match 50.0% < 60.0%")
