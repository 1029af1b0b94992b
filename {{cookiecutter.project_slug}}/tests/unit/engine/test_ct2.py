"""CTranslate2-side pieces that need no model: the torch-free chat tokenizer, thread limits and
the length bands that share a call."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.engine.ct2 import (
    _sample,
    length_bands,
    thread_split,
)
from {{ cookiecutter.package_name }}.engine.tokenizer import ChatTokenizer

from .test_prompts import CHATML

CHATS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what now"}],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny tokenizer saved by transformers, as a converted model directory holds it."""
    vocab = {"[UNK]": 0, "<|im_end|>": 1, "hello": 2, "there": 3}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", eos_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    directory = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("chat", CHATS)
def test_chat_prompts_render_exactly_as_transformers_renders_them(saved, chat):
    reference = AutoTokenizer.from_pretrained(saved)
    ours = ChatTokenizer(saved)
    expected = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = ours.apply_chat_template(chat, add_generation_prompt=True)
    assert text == expected
    assert ours(text)["input_ids"] == reference(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_and_round_trips(saved):
    ours = ChatTokenizer(saved)
    assert ours.eos_token == "<|im_end|>"
    assert ours.eos_token_id == 1
    ids = ours("hello there")["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == ["hello", "there"]
    assert ours.convert_tokens_to_ids(["hello", "there"]) == ids
    assert ours.decode(ids) == "hello there"


def test_a_directory_without_tokenizer_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        ChatTokenizer(tmp_path)


@pytest.mark.parametrize(
    ("inter", "intra", "cores", "expected"),
    [(1, 0, 8, (1, 8)), (2, 0, 8, (2, 4)), (4, 0, 2, None), (1, 3, 2, None), (2, 1, 2, (2, 1))],
)
def test_inter_times_intra_threads_never_exceeds_the_cores(inter, intra, cores, expected):
    if expected is None:
        with pytest.raises(ValueError, match="over the"):
            thread_split(inter, intra, cores)
    else:
        assert thread_split(inter, intra, cores) == expected


def test_seeded_sampling_is_reproducible_and_keeps_to_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    draws = [_sample(logits, 1.0, 0.8, np.random.default_rng(3)) for _ in range(5)]
    assert len(set(draws)) == 1  # the same seed, the same token
    many = {_sample(logits, 1.0, 0.8, np.random.default_rng(seed)) for seed in range(200)}
    assert many == {0, 1}  # 0.6 + 0.3 covers top_p=0.8: the tail is never drawn
    assert {_sample(logits, 1.0, 0.5, np.random.default_rng(s)) for s in range(50)} == {0}


def test_the_token_callback_keeps_each_row_to_its_own_limit():
    from types import SimpleNamespace

    from {{ cookiecutter.package_name }}.engine.ct2 import _heard
    from {{ cookiecutter.package_name }}.engine.prompts import (
        GenerationParams,
        PreparedRequest,
    )

    def prepared(limit: int) -> PreparedRequest:
        return PreparedRequest("r", "", [1], GenerationParams(limit, 0.0, 1.0, None, ()))

    heard: list[tuple[int, int]] = []
    callback = _heard([prepared(2), prepared(5)], lambda row, token: heard.append((row, token)))
    stops = [
        callback(SimpleNamespace(batch_id=row, token_id=step))
        for step in range(4)
        for row in (0, 1)
    ]
    assert heard == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2), (1, 3)]  # row 0: two tokens only
    assert stops == [False, False, True, False, True, False, True, False]


@pytest.mark.parametrize(
    ("lengths", "new_tokens", "bands"),
    [
        ([37, 217, 36, 155, 38], 32, [[0, 2, 4], [1], [3]]),  # far apart: calls of their own
        ([37, 217, 36, 155, 38], 64, [[0, 2, 4], [1, 3]]),
        ([37, 217, 36, 155, 38], 200, [[0, 1, 2, 3, 4]]),  # the new tokens outnumber the gap
        ([10, 17, 11, 18], 8, [[0, 1, 2], [3]]),  # within 8 of the band's shortest
        ([5], 1, [[0]]),
        ([], 8, []),
        ([9, 3, 9], 0, [[0, 2], [1]]),  # no new tokens: equal lengths still share
    ],
)
def test_prompts_share_a_call_only_within_the_new_tokens_of_its_shortest(
    lengths, new_tokens, bands
):
    assert length_bands(lengths, new_tokens) == bands
