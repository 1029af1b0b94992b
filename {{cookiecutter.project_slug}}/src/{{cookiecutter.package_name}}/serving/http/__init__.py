"""The OpenAI-compatible HTTP API (`serve`): the routes and their shapes, the generation thread
behind them, Prometheus metrics and the server that drains on SIGTERM."""
