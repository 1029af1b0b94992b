"""Inference engines behind one `Backend` protocol; `load_backend` picks the configured one."""

from {{ cookiecutter.package_name }}.backends.base import Backend, Completion
from {{ cookiecutter.package_name }}.model_source import resolve_for
from {{ cookiecutter.package_name }}.settings import Settings

__all__ = ["Backend", "Completion", "load_backend"]


def load_backend(settings: Settings) -> Backend:
    """Return the configured engine with its model, fetched or converted first if needed.

    Raises ModelSourceError when the model cannot be found, fetched, converted or loaded.
    """
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from {{ cookiecutter.package_name }}.backends.ct2 import CTranslate2Backend
        from {{ cookiecutter.package_name }}.quantize import (
            ct2_types,
            ensure_converted,
            registered_ct2,
        )

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
    from {{ cookiecutter.package_name }}.backends.hf import (
        TransformersBackend,
        pick_device,
    )
    from {{ cookiecutter.package_name }}.precision import resolve_dtype

    model_dir = resolve_for(settings)
    device = pick_device(settings.device).type
    return TransformersBackend(
        model_dir,
        device=device,
        dtype=resolve_dtype(settings, model_dir, device),
        num_threads=settings.num_threads,
    )
