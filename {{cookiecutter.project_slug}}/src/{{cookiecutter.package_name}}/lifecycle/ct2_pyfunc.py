"""The MLflow pyfunc of a CTranslate2 model, logged from this file (models from code).

A `ctranslate2.Generator` cannot be pickled, so MLflow stores this file and the package's code
with the model and builds the generator in `load_context`. `predict` takes prompts (strings,
chat message lists, or a DataFrame with a `prompt` column) and returns the answers, greedy.
"""

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class CTranslate2Chat(PythonModel):
    def load_context(self, context: Any) -> None:
        from pathlib import Path

        # Absolute imports: MLflow loads this file as a module of its own, outside the package
        # (whose code it ships with the model and puts on the path).
        from {{ cookiecutter.package_name }}.engine.ct2 import (
            META_FILE,
            CTranslate2Backend,
        )
        from {{ cookiecutter.package_name }}.engine.prompts import PromptBuilder
        from {{ cookiecutter.package_name }}.engine.service import InferenceService
        from {{ cookiecutter.package_name }}.messages import Reply

        model_dir = Path(context.artifacts["model"])
        meta = (model_dir / META_FILE).read_text() if (model_dir / META_FILE).is_file() else "{}"
        backend = CTranslate2Backend(model_dir, compute_type=_compute_type(meta))
        prompts = PromptBuilder(backend.tokenizer, context_window=backend.context_window)
        self.service = InferenceService(backend, prompts)
        self.reply_type = Reply

    def predict(self, context: Any, model_input: Any, params: dict | None = None) -> list[str]:
        if hasattr(model_input, "columns"):  # a pandas DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            model_input = model_input[column].tolist()
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        admitted = []
        for i, item in enumerate(model_input):
            key = "messages" if isinstance(item, list) else "prompt"
            raw = {"id": f"input-{i}", key: item, "max_new_tokens": max_new_tokens}
            admitted.append(self.service.admit(raw | {"temperature": 0.0}, f"input-{i}"))
        ready = [a for a in admitted if not isinstance(a, self.reply_type)]
        replies = iter(self.service.run(ready)) if ready else iter([])
        answers = []
        for item in admitted:
            reply = item if isinstance(item, self.reply_type) else next(replies)
            answers.append(reply.text if reply.error is None else f"[error] {reply.error.message}")
        return answers


def _compute_type(meta: str) -> str:
    import json

    from {{ cookiecutter.package_name }}.lifecycle.quantize import ct2_types

    scheme = json.loads(meta).get("quantization")
    return ct2_types(scheme)[1] if scheme else "default"


mlflow.models.set_model(CTranslate2Chat())
