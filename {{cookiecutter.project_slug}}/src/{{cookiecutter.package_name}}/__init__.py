"""Batched LLM inference: chat prompts, dynamic batching and pluggable engines."""

__version__ = "0.1.0"
