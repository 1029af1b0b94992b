"""The surfaces that feed the engine: each a thin adapter from a transport to the service.

It owns the files of a job (`replies`), the file batch job (`batch_job`), and RabbitMQ: the
topology, worker, client, `submit` and dead letters (`queue/`).
{%- if cookiecutter.worker_runtime == "ray" %}
Ray replicas, for the batch job and the worker: `distributed`.
{%- endif %}
It may import the engine, the lifecycle (to load a model and record runs) and the base
modules, never `bench` or `cli`.
"""
