"""The option axes, and the bakes the tests run.

Code axes change which files, modules and dependencies are rendered: every valid combination of
them is baked. Value axes only change a rendered value (a version, a default setting): each of
their values is baked once, on top of the defaults. A representative few bakes also run the
rendered project's integration tests on the real model.
"""

import itertools

# Axis -> values; the first value is the default. Later options add their axes here.
CODE_AXES: dict[str, list[str]] = {
    "inference_backend": ["transformers", "ctranslate2"],
    "worker_runtime": ["plain", "ray"],
    "tracking_backend": ["sqlite", "mysql"],
    "artifact_store": ["local", "s3"],
    "include_finetuning": ["yes", "no"],
}
VALUE_AXES: dict[str, list[str]] = {
    "python_version": ["3.11", "3.12", "3.13"],
    "license": ["MIT", "Apache-2.0", "BSD-3-Clause", "Proprietary"],
    "quantization": [
        "auto", "int8", "int8_float32", "int16", "int8_weights", "float32", "float16",
        "int8_float16", "bfloat16",
    ],
}  # fmt: skip

DEFAULTS = {axis: values[0] for axis, values in (CODE_AXES | VALUE_AXES).items()}
HUB_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
# What a value needs to be valid: quantization is a CTranslate2 answer, and the ones that fail
# the quality gate on the bundled model are refused with it (see hooks/pre_gen_project.py).
COMPANIONS = {
    "quantization": {"inference_backend": "ctranslate2", "model_id": HUB_MODEL},
}


def invalid(combo: dict[str, str]) -> bool:
    """The pairs the pre-gen hook refuses (tested in test_hooks.py)."""
    return combo.get("inference_backend") != "ctranslate2" and combo.get("quantization") not in (
        None,
        "auto",
    )


def all_combinations() -> list[dict[str, str]]:
    keys = list(CODE_AXES)
    product = [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*CODE_AXES.values())
    ]
    combos = [DEFAULTS | c for c in product]
    for axis, values in VALUE_AXES.items():
        for value in values[1:]:
            combos.append(DEFAULTS | COMPANIONS.get(axis, {}) | {axis: value})
    return [c for c in combos if not invalid(c)]


def combo_id(combo: dict[str, str]) -> str:
    shown = {k: v for k, v in combo.items() if DEFAULTS.get(k) != v}
    return "-".join(f"{k}={v.split('/')[-1]}" for k, v in shown.items()) or "defaults"


# Every optional part rendered: its dependencies are the shared test environment's.
FULLEST: dict[str, str] = DEFAULTS | {
    "inference_backend": "ctranslate2",
    "worker_runtime": "ray",
    "tracking_backend": "mysql",
    "artifact_store": "s3",
}

# Names that stress the derivations: unicode, digits, quotes, a long description.
AWKWARD_NAMES = {
    "project_name": "Ünïcode LLM Bot 2",
    "author_name": 'Zoë O\'Brien "quoted"',
    "description": "Quotes ' \" and {braces} and a very long description " + "that goes on " * 12,
}

# The longest package name the hook accepts (40 characters): rendered lines must still fit.
LONG_NAME = {"project_name": "My Extremely Verbose Llm Service Name Ab"}
