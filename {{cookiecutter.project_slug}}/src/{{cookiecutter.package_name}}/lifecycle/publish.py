"""Publishing the served model: register it in MLflow and point an alias at it
{%- if cookiecutter.inference_backend == "ctranslate2" %}, and convert it
to CTranslate2 through the quality gate{% endif %}.

The `model register`{% if cookiecutter.inference_backend == "ctranslate2" %} and `convert`{% endif %} commands call these; so can a scheduler or a notebook.
"""
{% if cookiecutter.inference_backend == "ctranslate2" %}
from collections.abc import Callable
{% endif %}
from ..settings import Settings
from .loading import served_model_dir
{%- if cookiecutter.inference_backend == "ctranslate2" %}
from .quality import GateReport, table
from .quantize import QualityGateError, convert, gate_device, schemes_for
{%- endif %}
from .registry import Registered, log_model, register, set_alias
{%- if cookiecutter.inference_backend == "ctranslate2" %}
from .sources import resolve_for
{%- endif %}
from .tracking import settings_params, start_run, tracking_uri


def register_served(settings: Settings, alias: str | None) -> Registered:
    """Log the served model in an MLflow run named `register`, register it as a new version of
    `settings.registered_model` and, unless `alias` is None, point the alias at it."""
    engine, model_dir = served_model_dir(settings)
    with start_run(settings, "register", settings_params(settings)) as run:
        run.log_params({"engine": engine, "model_dir": str(model_dir)})
        model_uri = log_model(run, model_dir, engine)
        registered = register(tracking_uri(settings), model_uri, settings.registered_model)
    if alias is not None:
        set_alias(tracking_uri(settings), registered.name, alias, registered.version)
    return registered
{%- if cookiecutter.inference_backend == "ctranslate2" %}


def convert_and_gate(
    settings: Settings, force: bool, every: bool, show: Callable[[str], None]
) -> list[GateReport]:
    """Convert the settings' model with its quantization (`every`: each compute type of this
    device), gate each against the float model, publish the passes, `show` the gate's table.

    Raises QualityGateError when nothing passed (unless `force`, which publishes anyway).
    """
    schemes = schemes_for(settings.quantization, every, gate_device())
    auto = settings.quantization == "auto" and not every
    reports = convert(settings, resolve_for(settings), schemes, force, stop_at_first_pass=auto)
    show(table(reports))
    if not any(r.passed for r in reports) and not force:
        failed = reports[-1]
        raise QualityGateError(
            f"{failed.scheme} failed the quality gate ({failed.why()}) and was not published; "
            "choose another quantization (auto picks the fastest that passes) or use --force"
        )
    return reports
{%- endif %}
