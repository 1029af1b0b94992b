"""The model lifecycle: where a model comes from, what form it is served in, and its records.

It owns the model cache and the sources looked up by scheme (`cache`, `sources`), loading the
configured engine with its model (`loading`), stored directories (`artifacts`), MLflow runs,
server and registry (`tracking`, `mlflow_server`, `registry`, `publish`), the quality gate and
the precision choice (`quality`, `precision`).
{%- if cookiecutter.inference_backend == "ctranslate2" %}
CTranslate2 conversion through the quality gate: `quantize`, and `ct2_pyfunc` for MLflow.
{%- endif %}
{%- if cookiecutter.include_finetuning == "yes" %}
LoRA fine-tuning, from chat data to a promoted model: `finetune/`.
{%- endif %}
It may import the engine and the base modules, never `serving`, `bench` or `cli`.
"""
