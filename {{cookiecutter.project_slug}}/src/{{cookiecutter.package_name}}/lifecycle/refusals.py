"""The quality gate's refusals, remembered: a scheme the gate refused for a model is not
converted and measured again while nothing the measurement depends on has changed (the model's
files, the evaluation set, the CTranslate2 version) and the thresholds would still refuse it.

A refusal is `<cache>/ct2/.<model>-<scheme>.refused.json` beside where the model would have been
published. Its measurements are judged again under the thresholds of each call, so loosening
a threshold converts again (the refused files themselves are never kept).
"""

import hashlib
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .quality import EVAL_DIR, GateReport, Thresholds, judge

log = logging.getLogger(__name__)


def record_path(published: Path) -> Path:
    """Where the refusal of the model that would be published at `published` is kept."""
    return published.parent / f".{published.name}.refused.json"


def measured_on(hf_dir: Path, device: str) -> str:
    """A digest of what a gate measurement of `hf_dir` depends on: its files (path, inode,
    size, modification and change times), the evaluation set and the gate's code, the versions
    of the libraries that convert and compute, and the `device` with its compute types."""
    import ctranslate2

    try:
        computes = sorted(ctranslate2.get_supported_compute_types(device))
    except RuntimeError:  # no such device here: then no record made here matches either
        computes = []
    facts = [str(hf_dir.resolve()), device, *computes]
    for package in ("ctranslate2", "torch", "transformers"):
        try:
            facts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            facts.append(f"{package} none")
    digest = hashlib.sha256("\0".join(facts).encode())
    for path in sorted(p for folder in (hf_dir, EVAL_DIR) for p in folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            times = f"{stat.st_ino} {stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns}"
            digest.update(f"\0{path} {times}".encode())
    digest.update(Path(__file__).with_name("quality.py").read_bytes())
    return digest.hexdigest()


def remember(published: Path, hf_dir: Path, device: str, report: GateReport) -> None:
    gate = report.to_json()
    record = {"measured_on": measured_on(hf_dir, device), "source_dir": str(hf_dir), "gate": gate}
    path = record_path(published)
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(record, indent=2) + "\n")
    staging.replace(path)  # whole or not at all, for a reader in another process


def forget(published: Path) -> None:
    record_path(published).unlink(missing_ok=True)


def refused_before(
    published: Path, hf_dir: Path, device: str, thresholds: Thresholds
) -> GateReport | None:
    """The remembered refusal of this model and scheme on `device`, judged under `thresholds`,
    if they still refuse it; None when there is none, it is stale, or it would pass now."""
    try:
        record = json.loads(record_path(published).read_text())
        if record["measured_on"] != measured_on(hf_dir, device):
            return None
        report = judge(GateReport.from_json(record["gate"]), thresholds)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.passed:
        return None
    log.info(
        "[%s] refused by the quality gate earlier, and still would be (%s): not converted "
        "again (delete %s to measure again; --force converts and publishes it anyway)",
        report.scheme,
        report.why(),
        record_path(published),
    )
    return report
