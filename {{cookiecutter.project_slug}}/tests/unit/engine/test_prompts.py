"""Prompt rendering on a tiny real tokenizer built here, so these tests need no model."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.engine.prompts import GenerationParams, PromptBuilder
from {{ cookiecutter.package_name }}.errors import ModelSourceError
from {{ cookiecutter.package_name }}.messages import RequestError, parse_request

from ..chat_templates import CHATML, jinja

DEFAULTS = GenerationParams(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None, stop=())


@pytest.fixture(scope="module")
def tokenizer():
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_end|>": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", eos_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    return fast


def builder(tokenizer, **overrides) -> PromptBuilder:
    options = {"context_window": 64, "defaults": DEFAULTS}
    return PromptBuilder(tokenizer, **(options | overrides))


def test_the_chat_template_is_applied_with_a_generation_prompt(tokenizer):
    text = builder(tokenizer).render(parse_request({"id": "a", "prompt": "hello there"}))
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def test_the_configured_system_prompt_comes_first_unless_the_chat_has_one(tokenizer):
    prompts = builder(tokenizer, system_prompt="be brief")
    plain = prompts.render(parse_request({"id": "a", "prompt": "hi"}))
    assert plain.startswith("<|im_start|>system\nbe brief<|im_end|>")
    own = {
        "id": "b",
        "messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}],
    }
    rendered = prompts.render(parse_request(own))
    assert "mine" in rendered
    assert "be brief" not in rendered


def test_defaults_fill_what_the_request_leaves_out(tokenizer):
    prepared = builder(tokenizer).prepare(
        parse_request({"id": "a", "prompt": "hi", "temperature": 0.7, "stop": ["x"]})
    )
    assert prepared.params == GenerationParams(8, 0.7, 1.0, None, ("x",))
    assert prepared.tokens == len(prepared.token_ids) + 8


def test_a_prompt_that_does_not_fit_the_context_window_is_refused_with_numbers(tokenizer):
    long = parse_request({"id": "a", "prompt": "word " * 60})
    with pytest.raises(RequestError) as caught:
        builder(tokenizer).prepare(long)
    assert caught.value.kind == "context_length_exceeded"
    assert "context window of 64 tokens" in str(caught.value)


def test_max_new_tokens_counts_against_the_context_window(tokenizer):
    short = {"id": "a", "prompt": "hi"}
    prompt_tokens = len(builder(tokenizer).prepare(parse_request(short)).token_ids)
    room = 64 - prompt_tokens
    builder(tokenizer).prepare(parse_request(short | {"max_new_tokens": room}))
    with pytest.raises(RequestError, match="context window"):
        builder(tokenizer).prepare(parse_request(short | {"max_new_tokens": room + 1}))


def test_an_absurd_max_new_tokens_is_refused_before_tokenizing(tokenizer):
    with pytest.raises(RequestError) as caught:
        builder(tokenizer).prepare(
            parse_request({"id": "a", "prompt": "hi", "max_new_tokens": 10**9})
        )
    assert caught.value.kind == "max_new_tokens_too_large"


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(ModelSourceError, match="chat template"):
        PromptBuilder(bare, context_window=64)


# Like Gemma's or Mistral's: no system role, and user and assistant must alternate.
STRICT = jinja(
    "<% for m in messages %><% if m['role'] == 'system' %>"
    "<< raise_exception('System role not supported') >><% endif %>"
    "<% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %>"
    "<< raise_exception('Conversation roles must alternate user/assistant/user/assistant') >>"
    "<% endif %><< m['content'] >> <% endfor %>"
)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        [{"role": "user", "content": "U"}, {"role": "user", "content": "again"}],
    ],
    ids=["system role", "two user turns"],
)
def test_a_chat_template_that_refuses_the_messages_is_that_request_s_error(tokenizer, messages):
    strict = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]", eos_token="<|im_end|>"
    )
    strict.chat_template = STRICT
    request = parse_request({"id": "t", "messages": messages})
    with pytest.raises(RequestError) as caught:
        builder(strict).prepare(request)
    assert caught.value.kind == "invalid_request"
    assert "chat template refused" in str(caught.value)


@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 0.0])
def test_a_temperature_too_small_to_divide_by_is_greedy(tokenizer, temperature):
    request = parse_request({"id": "t", "prompt": "a", "temperature": temperature})
    assert builder(tokenizer).prepare(request).params.greedy
