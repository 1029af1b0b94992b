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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .quality import EVAL_DIR, GateReport, Thresholds, judge

log = logging.getLogger(__name__)


def record_path(published: Path) -> Path:
    """Where the refusal of the model that would be published at `published` is kept."""
    return published.parent / f".{published.name}.refused.json"


def measured_on(hf_dir: Path) -> str:
    """A digest of what a gate measurement of `hf_dir` depends on."""
    try:
        ct2 = version("ctranslate2")
    except PackageNotFoundError:
        ct2 = "none"
    digest = hashlib.sha256(f"{hf_dir.resolve()}\0ctranslate2 {ct2}".encode())
    for folder in (hf_dir, EVAL_DIR):
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            stat = path.stat()
            digest.update(f"\0{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def remember(published: Path, hf_dir: Path, report: GateReport) -> None:
    gate = report.to_json()
    record = {"measured_on": measured_on(hf_dir), "source_dir": str(hf_dir), "gate": gate}
    record_path(published).write_text(json.dumps(record, indent=2) + "\n")


def forget(published: Path) -> None:
    record_path(published).unlink(missing_ok=True)


def refused_before(published: Path, hf_dir: Path, thresholds: Thresholds) -> GateReport | None:
    """The remembered refusal of this model and scheme, judged under `thresholds`, if they
    still refuse it; None when there is none, it is stale, or it would pass now."""
    try:
        record = json.loads(record_path(published).read_text())
        if record["measured_on"] != measured_on(hf_dir):
            return None
        report = judge(GateReport.from_json(record["gate"]), thresholds)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.passed:
        return None
    log.info(
        "[%s] refused by the quality gate earlier, and still would be (%s): not converted "
        "again (--force converts and publishes it anyway)",
        report.scheme,
        report.why(),
    )
    return report
