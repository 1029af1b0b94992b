"""Chat-template rendering and the context-window check, shared by every backend."""

from dataclasses import dataclass
from typing import Any

from ..errors import ModelSourceError, one_line
from ..messages import Request, RequestError

# Below this, a temperature is greedy decoding (as in vLLM): dividing logits by it would only
# overflow.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PreparedRequest:
    """A request rendered and tokenized, with every generation parameter filled in."""

    id: str | int | float
    text: str
    token_ids: list[int]
    params: GenerationParams
    stream: bool = False  # its text is published as it is decoded (queue chunks)

    @property
    def tokens(self) -> int:
        """What this request occupies in a batch: prompt plus the tokens it may generate."""
        return len(self.token_ids) + self.params.max_new_tokens


class PromptBuilder:
    """Renders requests through the tokenizer's chat template and enforces the context window."""

    def __init__(
        self,
        tokenizer: Any,
        context_window: int,
        system_prompt: str | None = None,
        defaults: GenerationParams | None = None,
        max_new_tokens_limit: int = 4096,
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ModelSourceError(
                "the model's tokenizer has no chat template; use a chat or instruct model"
            )
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.system_prompt = system_prompt
        self.defaults = defaults or GenerationParams(64, 0.0, 1.0, None, ())
        self.max_new_tokens_limit = max_new_tokens_limit

    def render(self, request: Request) -> str:
        """The prompt text: the chat template applied, with the generation prompt appended (or
        the prompt itself, for a request without the template)."""
        if not request.chat_template:
            return request.prompt or ""
        chat = with_system_prompt(request.chat(), self.system_prompt)
        try:
            return self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # noqa: BLE001 - a template may refuse roles or their order
            reason = one_line(exc)
            raise RequestError(
                "invalid_request", f"the model's chat template refused these messages: {reason}"
            ) from None

    def prepare(self, request: Request) -> PreparedRequest:
        """Render and tokenize `request` and fill in defaults.

        Raises RequestError when max_new_tokens is over the limit or the prompt plus
        max_new_tokens does not fit the context window.
        """
        params = resolve_params(request, self.defaults)
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise RequestError(
                "max_new_tokens_too_large",
                f"max_new_tokens={params.max_new_tokens} is over the limit of "
                f"{self.max_new_tokens_limit}",
            )
        text = self.render(request)
        # The template already holds the special tokens (e.g. <|im_start|>): add none twice.
        special = not request.chat_template
        token_ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        needed = len(token_ids) + params.max_new_tokens
        if needed > self.context_window:
            raise RequestError(
                "context_length_exceeded",
                f"prompt has {len(token_ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                f"that is {needed}, over the context window of {self.context_window} tokens",
            )
        return PreparedRequest(request.id, text, token_ids, params, stream=request.stream)


def resolve_params(request: Request, defaults: GenerationParams) -> GenerationParams:
    """The request's generation parameters, with `defaults` for those it leaves out."""
    temperature = defaults.temperature if request.temperature is None else request.temperature
    return GenerationParams(
        max_new_tokens=request.max_new_tokens or defaults.max_new_tokens,
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=defaults.seed if request.seed is None else request.seed,
        stop=tuple(request.stop) or defaults.stop,
    )


def with_system_prompt(
    chat: list[dict[str, str]], system_prompt: str | None
) -> list[dict[str, str]]:
    """`chat` with the configured system prompt first, unless the chat brings its own."""
    if system_prompt and chat[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *chat]
    return chat
