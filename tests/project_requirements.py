"""Write the requirements of the fullest bake, read from its own pyproject.toml, to argv[1].

The shared test environment installs these once, so every bake's tests run without
installing anything, and the dependencies are declared in one place: the template.
"""

import sys
import tempfile
import tomllib
from pathlib import Path

from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TEMPLATE / "tests"))
from combinations import FULLEST  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(
            cookiecutter(str(TEMPLATE), no_input=True, output_dir=tmp, extra_context=FULLEST)
        )
        meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    requirements = list(meta["dependencies"])
    for extra in meta.get("optional-dependencies", {}).values():
        requirements += extra
    Path(sys.argv[1]).write_text("\n".join(sorted(set(requirements))) + "\n")


if __name__ == "__main__":
    main()
