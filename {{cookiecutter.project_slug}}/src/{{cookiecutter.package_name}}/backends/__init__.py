"""Inference engines behind one `Backend` protocol; `load_backend` picks the configured one."""

from pathlib import Path

from {{ cookiecutter.package_name }}.backends.base import Backend, Completion
from {{ cookiecutter.package_name }}.settings import Settings

__all__ = ["Backend", "Completion", "load_backend"]


def load_backend(settings: Settings, model_dir: Path) -> Backend:
    """Return the configured engine loaded from `model_dir` (a resolved local directory)."""
    from {{ cookiecutter.package_name }}.backends.hf import TransformersBackend

    return TransformersBackend(
        model_dir, device=settings.device, dtype=settings.dtype, num_threads=settings.num_threads
    )
