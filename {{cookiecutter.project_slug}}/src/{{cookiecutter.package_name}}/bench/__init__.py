"""The benchmark (`bench`): every engine and the worker on one prompt set, as ratios to a naive
baseline. It owns the modes and what each measures (`modes`), running an engine in process
(`inprocess`) in a child process of its own (`child`), the worker through RabbitMQ
(`worker_modes`), the report (`report`) and the whole run (`run`). It may import the layers
below it (engine, lifecycle, serving) and the base modules (settings, messages, errors, stats),
never `cli`: the `bench` command in `cli/bench.py` only parses, loads the settings and calls
`bench.run.run_bench`.
"""
