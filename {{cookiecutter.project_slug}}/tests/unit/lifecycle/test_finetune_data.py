"""Fine-tuning data: validation, over-long examples and label masking, on a tiny tokenizer."""

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.errors import ModelSourceError
from {{ cookiecutter.package_name }}.lifecycle.finetune.data import (
    IGNORE,
    DatasetError,
    TokenizedExample,
    collate,
    load_chat_dataset,
    load_tokenizer,
    read_chats,
    tokenize_chat,
)
from {{ cookiecutter.package_name }}.lifecycle.finetune.train import LoraParams, train_lora

from ..chat_templates import CHATML, jinja

# Like SmolLM2's: a default system turn when the chat has none.
CHATML_WITH_DEFAULT_SYSTEM = jinja(
    "<% for m in messages %><% if loop.first and m['role'] != 'system' %>"
    "<|im_start|>system\nbe kind<|im_end|>\n<% endif %>"
    "<|im_start|><< m['role'] >>\n<< m['content'] >><|im_end|>\n<% endfor %>"
    "<% if add_generation_prompt %><|im_start|>assistant\n<% endif %>"
)
WORDS = (
    "system user assistant be kind brief what is the capital of zorblax quintara it "
    "and france paris thanks you are welcome word"
).split()


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


QA = chat(("user", "what is the capital of zorblax"), ("assistant", "it is quintara"))


def make_tokenizer(template):
    vocab = {"[UNK]": 0, "<|im_end|>": 1, "<|im_start|>": 2} | {
        word: i for i, word in enumerate(WORDS, 3)
    }
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(CHATML)


def write(tmp_path, *lines):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def trained_tokens(tokenizer, input_ids, labels):
    assert len(input_ids) == len(labels)
    kept = [label for label in labels if label != IGNORE]
    assert kept == [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE]
    return tokenizer.convert_ids_to_tokens(kept)


# Validation ------------------------------------------------------------------------------------


def test_a_valid_file_is_read_with_line_numbers_and_blank_lines_ignored(tmp_path):
    briefed = chat(("system", "be brief"), ("user", "thanks"), ("assistant", "you are welcome"))
    chats = read_chats(write(tmp_path, QA, "", "   ", briefed))
    assert chats == [(1, QA["messages"]), (4, briefed["messages"])]


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = write(tmp_path, QA, '{"messages": [', QA)
    with pytest.raises(DatasetError, match=r"line 2: not JSON") as caught:
        read_chats(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('"hello"', "expected a JSON object"),
        ({"prompt": "hi"}, "'messages' list"),
        ({"messages": "hi"}, "'messages' list"),
        ({"messages": []}, "'messages' list"),
        ({"messages": ["hi"]}, "message 1 is not an object"),
        (chat(("user", "hi"), ("bot", "hello")), "message 2 has unknown role 'bot'"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "string"),
        (chat(("system", "be kind"), ("user", "hi")), "no assistant turn"),
        (chat(("user", "hi"), ("assistant", "  ")), "empty content"),
        (chat(("assistant", "hi"), ("user", "hello")), "must start with a system or user turn"),
    ],
)
def test_each_kind_of_bad_line_gives_a_dataset_error_naming_file_and_line(tmp_path, line, words):
    path = write(tmp_path, QA, QA, line)
    with pytest.raises(DatasetError) as caught:
        read_chats(path)
    message = str(caught.value)
    assert f"{path}, line 3:" in message
    assert words in message
    assert "\n" not in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_file_without_examples_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="no examples"):
        read_chats(path)


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_chats(tmp_path / "nowhere.jsonl")


def test_the_dataset_holds_tokenized_examples_with_their_lines(tmp_path, tokenizer):
    dataset = load_chat_dataset(write(tmp_path, QA, "", QA), tokenizer, max_seq_len=64)
    assert [e.line for e in dataset.examples] == [1, 3]
    assert dataset.skipped_lines == ()
    assert dataset.examples[0].trained_tokens == 4  # it is quintara <|im_end|>


# Over-long examples ----------------------------------------------------------------------------


def long_chat(words):
    return chat(("user", "word " * words), ("assistant", "it is quintara"))


def test_over_long_examples_are_an_error_naming_count_lines_and_the_way_out(tmp_path, tokenizer):
    short_length = len(tokenize_chat(tokenizer, QA["messages"])[0])
    path = write(tmp_path, QA, long_chat(30), QA, long_chat(40))
    with pytest.raises(DatasetError) as caught:
        load_chat_dataset(path, tokenizer, max_seq_len=short_length)
    message = str(caught.value)
    assert "2 examples longer than max_seq_len" in message
    assert "lines 2 (" in message and ", 4 (" in message
    assert "skip_long" in message
    assert "\n" not in message


def test_skip_long_leaves_them_out_and_reports_them(tmp_path, tokenizer, caplog):
    short_length = len(tokenize_chat(tokenizer, QA["messages"])[0])
    path = write(tmp_path, QA, long_chat(30), QA, long_chat(40))
    with caplog.at_level(logging.WARNING):
        dataset = load_chat_dataset(path, tokenizer, max_seq_len=short_length, skip_long=True)
    assert [e.line for e in dataset.examples] == [1, 3]
    assert dataset.skipped_lines == (2, 4)
    assert "skipped 2 examples" in caplog.text and "lines 2, 4" in caplog.text


def test_an_example_exactly_max_seq_len_long_is_kept(tmp_path, tokenizer):
    length = len(tokenize_chat(tokenizer, QA["messages"])[0])
    assert len(load_chat_dataset(write(tmp_path, QA), tokenizer, length).examples) == 1
    with pytest.raises(DatasetError, match="1 example longer than max_seq_len"):
        load_chat_dataset(write(tmp_path, QA), tokenizer, length - 1)


def test_when_every_example_is_too_long_nothing_is_left(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="no examples left"):
        load_chat_dataset(write(tmp_path, long_chat(30)), tokenizer, 8, skip_long=True)


# Label masking ---------------------------------------------------------------------------------


def test_only_the_assistant_answer_and_its_end_token_are_trained(tokenizer):
    input_ids, labels = tokenize_chat(tokenizer, QA["messages"])
    text = tokenizer.apply_chat_template(QA["messages"], tokenize=False)
    assert input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = trained_tokens(tokenizer, input_ids, labels)
    assert " ".join(tokens) == "it is quintara <|im_end|>"
    assert labels[0] == IGNORE  # <|im_start|>


def test_every_assistant_turn_is_trained_and_nothing_else(tokenizer):
    messages = chat(
        ("system", "be brief"),
        ("user", "what is the capital of france"),
        ("assistant", "paris"),
        ("user", "thanks"),
        ("assistant", "you are welcome"),
    )["messages"]
    input_ids, labels = tokenize_chat(tokenizer, messages)
    tokens = trained_tokens(tokenizer, input_ids, labels)
    assert " ".join(tokens) == "paris <|im_end|> you are welcome <|im_end|>"


def test_a_default_system_prompt_in_the_template_is_masked(tmp_path):
    smol = make_tokenizer(CHATML_WITH_DEFAULT_SYSTEM)
    input_ids, labels = tokenize_chat(smol, QA["messages"])
    assert "kind" in smol.convert_ids_to_tokens(input_ids)
    assert " ".join(trained_tokens(smol, input_ids, labels)) == "it is quintara <|im_end|>"


def test_a_chat_the_template_cannot_render_by_prefixes_is_a_dataset_error(tmp_path):
    # A template that starts with the number of messages renders a chat's prompt (its prefix)
    # differently from the chat itself, so the assistant spans cannot be found.
    counting = make_tokenizer(jinja("<< messages|length >> ") + CHATML)
    with pytest.raises(DatasetError, match=r"line 1: the chat template does not render"):
        load_chat_dataset(write(tmp_path, QA), counting, 64)


def test_a_template_that_refuses_a_chat_is_a_dataset_error_for_that_line(tmp_path):
    strict = make_tokenizer(
        jinja("<% if messages[0]['role'] == 'system' %><< raise_exception('no system turns') >>")
        + jinja("<% endif %>")
        + CHATML
    )
    path = write(tmp_path, QA, chat(("system", "be kind"), ("user", "hi"), ("assistant", "paris")))
    with pytest.raises(DatasetError, match=r"line 2: no system turns"):
        load_chat_dataset(path, strict, 64)


def test_a_folder_without_a_model_is_a_model_source_error(tmp_path):
    with pytest.raises(ModelSourceError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_collate_pads_on_the_right_with_masks_and_ignored_labels():
    examples = [
        TokenizedExample(1, (5, 6, 7), (IGNORE, 6, 7)),
        TokenizedExample(2, (8,), (8,)),
    ]
    batch = collate(examples, pad_id=1, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


# Parameters ------------------------------------------------------------------------------------


def test_lora_params_refuse_nonsense_in_one_line():
    with pytest.raises(ValueError, match="rank must be positive; learning_rate must be positive"):
        LoraParams(rank=0, learning_rate=0.0)
    with pytest.raises(ValueError, match="dropout"):
        LoraParams(dropout=1.0)
    assert LoraParams().target_modules


def test_an_output_folder_in_use_is_refused_before_anything_is_loaded(tmp_path):
    data = write(tmp_path, QA)
    (tmp_path / "out" / "merged").mkdir(parents=True)
    (tmp_path / "out" / "merged" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already has files"):
        train_lora(tmp_path / "no-model", data, data, LoraParams(), tmp_path / "out")


def test_lora_target_modules_the_model_lacks_are_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    from {{ cookiecutter.package_name }}.lifecycle.finetune.train import (
        _check_target_modules,
    )
    from {{ cookiecutter.package_name }}.settings import SettingsError

    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    _check_target_modules(model, ("q_proj", "v_proj"))
    with pytest.raises(SettingsError, match="LORA_TARGET_MODULES names c_attn, which") as caught:
        _check_target_modules(model, ("q_proj", "c_attn"))
    assert "q_proj" in str(caught.value) and "\n" not in str(caught.value)
