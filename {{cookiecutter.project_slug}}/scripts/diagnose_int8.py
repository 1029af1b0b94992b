"""Where CTranslate2's int8 hurts the model: int8 simulated in torch, one part at a time.

A research tool, not part of the service: when the quality gate refuses int8, this says whether
the damage comes from the weights or the activations, and from which layer group. Run it in the
project's environment:

    python scripts/diagnose_int8.py [--model SPEC] [--prompts N]

It prints a Markdown table of teacher-forced top-1 agreement with the float model on the
evaluation set the gate uses.
"""

import argparse
import logging
import sys
from typing import Any

import numpy as np

from {{ cookiecutter.package_name }}.errors import ModelSourceError
from {{ cookiecutter.package_name }}.lifecycle.quality import EVAL_DIR, EvalSet, Reference
from {{ cookiecutter.package_name }}.lifecycle.sources import resolve_for
from {{ cookiecutter.package_name }}.settings import SettingsError, load_settings

LAYER_GROUPS = {
    "q_proj,k_proj,v_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_proj,up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def diagnose_int8(reference: Reference) -> list[tuple[str, float]]:
    """Top-1 agreement with the float model when int8 is simulated on one part at a time.

    CTranslate2's int8 quantizes weights per output row and activations per token, both
    symmetric to 127 levels; this reproduces it in torch on chosen layers, so the damage can
    be traced to a step (weights or activations) and to a layer group.
    """
    torch = reference.torch
    linears = {
        name: module
        for name, module in reference.model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head"
    }
    everything = list(linears)
    rows = [
        ("all layers: int8 weights and activations", agreement(reference, linears, True, True)),
        ("all layers: int8 weights only", agreement(reference, linears, True, False)),
        ("all layers: int8 activations only", agreement(reference, linears, False, True)),
    ]
    for label, suffixes in LAYER_GROUPS.items():
        chosen = {n: linears[n] for n in everything if n.split(".")[-1] in suffixes}
        rows.append(
            (f"{label} only: weights and activations", agreement(reference, chosen, True, True))
        )
    return rows


def agreement(reference: Reference, layers: dict[str, Any], weights: bool, acts: bool) -> float:
    """Top-1 agreement with the reference's greedy answers, int8 simulated on `layers`' weights
    and/or input activations; the layers are restored afterwards."""
    saved = {name: layer.weight.data.clone() for name, layer in layers.items()} if weights else {}
    hooks = []
    try:
        for layer in layers.values():
            if weights:
                w = layer.weight.data
                scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
                layer.weight.data = (w / scale).round() * scale
            if acts:
                hooks.append(layer.register_forward_pre_hook(_fake_int8_input))
        return _top1(reference)
    finally:
        for hook in hooks:
            hook.remove()
        for name, weight in saved.items():
            layers[name].weight.data = weight


def _top1(reference: Reference) -> float:
    """Teacher-forced top-1 agreement of the model as it is now with the reference's answers."""
    torch = reference.torch
    agree = total = 0
    for prompt, answer in zip(reference.prompt_ids, reference.answers, strict=True):
        full = prompt + answer
        with torch.inference_mode():
            logits = reference.model(torch.tensor([full])).logits[0].float()
        got = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(full) - 1].argmax(-1)
        agree += int((got.numpy() == np.array(answer)).sum())
        total += len(answer)
    return agree / max(1, total)


def _fake_int8_input(module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    (x,) = inputs
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return ((x / scale).round() * scale,)


def positive(text: str) -> int:
    """argparse type: an integer of at least 1, or argparse's one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model spec; default from settings")
    parser.add_argument(
        "--prompts", type=positive, help="Only the first N evaluation prompts (a quick look)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        model_dir = resolve_for(load_settings(model=args.model))
    except (ModelSourceError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    eval_set = EvalSet.load(EVAL_DIR)
    total = len(eval_set.chats)
    eval_set.chats = eval_set.chats[: args.prompts]
    rows = diagnose_int8(Reference(model_dir, eval_set))
    print(f"On {len(eval_set.chats)} of the {total} evaluation prompts:\n")
    print("| int8 simulated on | top-1 agreement |\n| --- | --- |")
    for label, top1 in rows:
        print(f"| {label} | {top1:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
