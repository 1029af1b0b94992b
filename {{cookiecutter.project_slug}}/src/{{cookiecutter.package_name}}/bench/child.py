"""One in-process mode in a child process of its own, and the protocol between it and `bench`.

Each in-process mode runs in a fresh process, so that its peak memory is its own and no mode
warms the caches of the next. `run_child` (the parent's side) starts

    python -m {{ cookiecutter.package_name }}.bench.child \\
        MODE --prompts PROMPTS --max-new-tokens N --result RESULT

and writes the parent's settings as JSON to its stdin: read once, at the edge, by the parent,
and never on a command line or in a file (a URL may hold a password). The child runs the mode
(`bench.inprocess.run_in_process`), writes its ModeResult as one JSON object (the dataclass's
fields) to RESULT and exits 0; on any failure it exits non-zero with the error on stderr and
RESULT is not written. Its stdout is discarded; its logging goes to stderr.
"""

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from ..bench.inprocess import run_in_process
from ..bench.modes import ModeResult
from ..settings import Settings

MODULE = "{{ cookiecutter.package_name }}.bench.child"  # run as `python -m MODULE`


def run_child(mode: str, settings: Settings, prompts: Path, max_new_tokens: int) -> ModeResult:
    """Run `mode` in a fresh child process and return its result.

    Raises RuntimeError if the child fails (its own error is on stderr, above).
    """
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
        prog=f"python -m {MODULE}",
        description="Run one in-process bench mode; read the settings as JSON on stdin.",
    )
    parser.add_argument("mode")
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL of prompts")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings.model_validate_json(sys.stdin.read())
    outcome = run_in_process(args.mode, settings, args.prompts, args.max_new_tokens)
    args.result.write_text(json.dumps(dataclasses.asdict(outcome)))


if __name__ == "__main__":
    main()
