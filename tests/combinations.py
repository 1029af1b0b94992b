"""The option axes that change what is rendered, and the bakes the tests run.

Every valid combination of the axes is baked and checked; a representative few also run the
rendered project's integration tests on the real model.
"""

import itertools

# Axis -> its values; the first value is the default. Later options add their axes here.
AXES: dict[str, list[str]] = {
    "python_version": ["3.11", "3.12", "3.13"],
}

# Combinations the hooks refuse; none yet. Each entry: a predicate over one combination.
INVALID: list = []


def all_combinations() -> list[dict[str, str]]:
    keys = list(AXES)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*AXES.values())]
    return [c for c in combos if not any(rule(c) for rule in INVALID)]


def combo_id(combo: dict[str, str]) -> str:
    return "-".join(f"{k}={v}" for k, v in combo.items())


DEFAULTS = {axis: values[0] for axis, values in AXES.items()}
# Every optional part rendered: its dependencies are the shared test environment's.
FULLEST: dict[str, str] = dict(DEFAULTS)

# Names that stress the derivations: unicode, digits, long words, the package name told apart.
AWKWARD_NAMES = {
    "project_name": "Ünïcode LLM Bot 2",
    "author_name": 'Zoë O\'Brien "quoted"',
    "description": "Quotes ' \" and {braces} and a very long description " + "that goes on " * 12,
}

# Bakes that also run the rendered integration tests (the real model).
REPRESENTATIVE: list[dict[str, str]] = [
    dict(DEFAULTS),
    dict(DEFAULTS) | {"python_version": "3.13"} | AWKWARD_NAMES,
]
