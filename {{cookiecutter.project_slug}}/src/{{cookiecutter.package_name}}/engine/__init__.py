"""The engine: from a validated request to generated text, on one machine.

It owns chat-template rendering and context checks (`prompts`), dynamic and continuous
batching (`batching`, `continuous`), the backends behind one protocol (`backend`, and `hf`
for transformers), and the inference service that admits, runs and answers (`service`).
{%- if cookiecutter.inference_backend == "ctranslate2" %}
CTranslate2 runs behind the same protocol: `ct2`, with its tokenizer in `tokenizer`.
{%- endif %}
It imports only the base modules (`settings`, `messages`, `errors`, `stats`): no broker, no
HTTP, no MLflow, no model download; a backend is given a local directory.
"""
