"""Each in-process mode (`bench.modes.run_in_process`) runs in a fresh child process, so that
its peak memory is its own and no mode warms the caches of the next. `run_child`, the parent's
side, runs `python -m` this module with MODE --prompts PROMPTS --max-new-tokens N --result
RESULT and the parent's settings as JSON on stdin (never on a command line or in a file: a URL
may hold a password). The child writes its ModeResult's fields as one JSON object to RESULT and
exits 0; on a failure it exits non-zero with the error on stderr and no RESULT. Its stdout is
discarded; its logging goes to stderr."""

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from ..settings import Settings
from .modes import ModeResult, run_in_process

MODULE = "{{ cookiecutter.package_name }}.bench.child"  # run as `python -m MODULE`


def run_child(mode: str, settings: Settings, prompts: Path, max_new_tokens: int) -> ModeResult:
    """`mode`'s result from a fresh child process; RuntimeError if it fails (its error is above)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", MODULE, mode, "--prompts", str(prompts)]
        command += ["--max-new-tokens", str(max_new_tokens), "--result", str(result)]
        done = subprocess.run(
            command, input=settings.model_dump_json(), text=True, stdout=subprocess.DEVNULL
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bench mode {mode} failed in its child process (exit status "
                f"{done.returncode}); its error is above"
            )
        return ModeResult(**json.loads(result.read_text()))


def main(argv: list[str] | None = None) -> None:
    """The child's side: settings from stdin, the mode's ModeResult to the result path."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description="Run one bench mode; settings as JSON on stdin."
    )
    parser.add_argument("mode")
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL of prompts")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings.model_validate_json(sys.stdin.read())
    outcome = run_in_process(args.mode, settings, args.prompts, args.max_new_tokens)
    args.result.write_text(json.dumps(dataclasses.asdict(outcome)))


if __name__ == "__main__":
    main()
