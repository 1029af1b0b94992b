"""From settings to a loaded engine: resolve the model, convert it if the engine needs it, load.

`load_backend` picks the configured engine (`engine/`) and gives it a local model directory
(`sources.py`).
{%- if cookiecutter.inference_backend == "ctranslate2" %} For CTranslate2 the model is converted
once, through the quality gate (`quantize.py`).
{%- endif %}

A server generates on a thread of its own; `load_service_apart` loads on a thread that then ends.
"""

import threading
from pathlib import Path

from ..engine.backend import Backend
from ..engine.prompts import resolve_params, with_system_prompt
from ..engine.service import InferenceService, generation_defaults
from ..messages import Reply, parse_request
from ..settings import Settings
from .sources import resolve_for


def load_backend(settings: Settings) -> Backend:
    """Return the configured engine with its model, fetched or converted first if needed.

    Raises ModelSourceError when the model cannot be found, fetched, converted or loaded.
    """
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from ..engine.ct2 import CTranslate2Backend
        from .quantize import ct2_types, ensure_converted, registered_ct2

        model_dir, scheme = registered_ct2(settings) or ensure_converted(settings)
        return CTranslate2Backend(
            model_dir,
            device=settings.device,
            compute_type=ct2_types(scheme)[1],
            inter_threads=settings.inter_threads,
            intra_threads=settings.intra_threads,
            max_batch_tokens=settings.max_batch_tokens,
        )
{%- endif %}
    from ..engine.hf import TransformersBackend, pick_device
    from .precision import resolve_dtype

    model_dir = resolve_for(settings)
    device = pick_device(settings.device).type
    return TransformersBackend(
        model_dir,
        device=device,
        dtype=resolve_dtype(settings, model_dir, device),
        num_threads=settings.num_threads,
    )


def load_service(settings: Settings) -> InferenceService:
    """The inference service of the configured engine, its model loaded (see `load_backend`)."""
    return InferenceService.from_settings(settings, load_backend(settings))


def load_service_apart(settings: Settings) -> InferenceService:
    """`load_service` on a thread of its own that ends with it, for a process that generates on
    another thread. Each thread that runs torch's parallel kernels keeps an OpenMP thread pool
    alive; two pools on the same cores stop spinning and sleep instead (libgomp's throttling),
    and the generating thread's matrix products took 1.5x as long (43 against 28 ms a step's
    worth at 8 rows, measured). Loading on a passing thread leaves the generating thread the
    only pool."""
    loaded: list[InferenceService] = []
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded.append(load_service(settings))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=load, name="load-model", daemon=True)  # Ctrl-C ends it
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return loaded[0]


def served_model_dir(settings: Settings) -> tuple[str, Path]:
    """(engine, directory) of the model the configured engine serves
{%- if cookiecutter.inference_backend == "ctranslate2" %}: the CTranslate2 copy
    (registered, or converted through the quality gate) or the transformers directory
{%- endif %}."""
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from .quantize import ensure_converted, registered_ct2

        return "ctranslate2", (registered_ct2(settings) or ensure_converted(settings))[0]
{%- endif %}
    return "transformers", resolve_for(settings)


def answer_one(settings: Settings, raw: dict) -> Reply:
    """The reply to one request (a dict of the request schema), with the configured engine."""
    service = load_service(settings)
    admitted = service.admit(raw, "cli")
    return admitted if isinstance(admitted, Reply) else service.run([admitted])[0]


def pipeline_answer(settings: Settings, raw: dict) -> str:
    """The answer of `transformers.pipeline("text-generation")` to one request: the quick path,
    a reference for the batched engines."""
    from ..engine.hf import generate_with_pipeline

    request = parse_request(raw)
    chat = with_system_prompt(request.chat(), settings.system_prompt)
    params = resolve_params(request, generation_defaults(settings))
    return generate_with_pipeline(resolve_for(settings), chat, params)
