"""Finish the rendered project: record the answers, prune what the options do not need."""

import json
import shutil
from pathlib import Path

ANSWERS = json.loads(r"""{{ cookiecutter | tojson }}""")
PROJECT = Path.cwd()
PACKAGE = ANSWERS["package_name"]

# Option -> files and folders that only that option's other values need. Each later option adds
# one small remove_* function here, so that what a choice prunes is obvious at a glance.


def remove(*relative: str) -> None:
    for name in relative:
        path = PROJECT / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_ctranslate2_files() -> None:
    remove(
        f"src/{PACKAGE}/engine/ct2.py",
        f"src/{PACKAGE}/engine/tokenizer.py",
        f"src/{PACKAGE}/engine/waves.py",
        f"src/{PACKAGE}/lifecycle/ct2_pyfunc.py",
        f"src/{PACKAGE}/lifecycle/quantize.py",
        f"src/{PACKAGE}/lifecycle/refusals.py",
        "docs/ctranslate2.md",
        "scripts",
        "tests/unit/engine/test_ct2.py",
        "tests/unit/engine/test_waves.py",
        "tests/unit/lifecycle/test_refusals.py",
        "tests/integration/lifecycle/test_ctranslate2.py",
    )


def remove_ray_files() -> None:
    remove(
        f"src/{PACKAGE}/serving/distributed.py",
        "tests/integration/serving/test_ray.py",
        "tests/unit/serving/test_distributed.py",
    )


def remove_mysql_files() -> None:
    remove("tests/integration/lifecycle/test_tracking_mysql.py")


def remove_s3_files() -> None:
    remove("tests/integration/lifecycle/test_artifacts_s3.py")


def remove_finetuning_files() -> None:
    remove(
        f"src/{PACKAGE}/lifecycle/finetune",
        f"src/{PACKAGE}/cli/finetune.py",
        "data/finetune_sample.jsonl",
        "data/finetune_eval.jsonl",
        "tests/unit/lifecycle/test_finetune_data.py",
        "tests/integration/lifecycle/test_finetune.py",
    )


def record_answers() -> None:
    """Write the answers (not the machine-specific `_` keys) so the project can be re-rendered."""
    answers = {k: v for k, v in ANSWERS.items() if not k.startswith("_")}
    answers["_template"] = ANSWERS.get("_template", "")
    (PROJECT / ".cookiecutter.json").write_text(json.dumps(answers, indent=2) + "\n")


def main() -> None:
    if ANSWERS["inference_backend"] != "ctranslate2":
        remove_ctranslate2_files()
    if ANSWERS["worker_runtime"] != "ray":
        remove_ray_files()
    if ANSWERS["tracking_backend"] != "mysql":
        remove_mysql_files()
    if ANSWERS["artifact_store"] != "s3":
        remove_s3_files()
    if ANSWERS["include_finetuning"] != "yes":
        remove_finetuning_files()
    record_answers()
    print(
        f"\nRendered {ANSWERS['project_slug']}. Next:\n"
        f"  cd {ANSWERS['project_slug']}\n  make install run   # the main job, offline\n"
        "  make test          # unit and integration tests\n"
    )


if __name__ == "__main__":
    main()
