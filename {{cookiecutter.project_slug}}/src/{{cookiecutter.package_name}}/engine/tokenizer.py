"""A chat tokenizer on `tokenizers` and `jinja2` alone: CTranslate2 serving never imports torch.

It renders chat templates the way `transformers` does (a sandboxed Jinja environment with
`trim_blocks`, `lstrip_blocks` and loop controls), so prompts are the same token for token.
"""

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class ChatTokenizer:
    def __init__(self, directory: Path) -> None:
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = directory / "chat_template.jinja"
        self.chat_template: str | None = (
            template_path.read_text() if template_path.is_file() else config.get("chat_template")
        )
        self.eos_token = _content(config.get("eos_token"))
        self.bos_token = _content(config.get("bos_token"))
        self.eos_token_id = self._tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @cached_property
    def _template(self) -> Any:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template or "")

    def apply_chat_template(
        self, chat: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        """The rendered prompt text (this class never tokenizes here: call it on the text)."""
        return self._template.render(
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": encoding.ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """The tokens of `ids`; None for an id outside the vocabulary."""
        return [self._tokenizer.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int | None]:
        """The ids of `tokens`; None for a token outside the vocabulary."""
        return [self._tokenizer.token_to_id(t) for t in tokens]


def _content(token: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _raise(message: str) -> None:
    raise TemplateError(message)
