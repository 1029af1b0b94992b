"""Continuous batching on a tiny random Llama built here: the same texts as `generate`, whatever
joins or leaves the batch, and one broken request fails alone."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.engine.hf import TransformersBackend
from {{ cookiecutter.package_name }}.engine.prompts import (
    GenerationParams,
    PreparedRequest,
)

VOCAB = 48


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> TransformersBackend:
    model_dir: Path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"[UNK]": 0, "<|im_end|>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.save_pretrained(model_dir)
    save_tiny_llama(model_dir, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    return TransformersBackend(model_dir, device="cpu", dtype="float32", num_threads=1)


def save_tiny_llama(model_dir: Path, **shape: int) -> None:
    """A random 2-layer Llama of this `shape` (hidden size, heads...) into `model_dir`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=1,
        **({"intermediate_size": 64} | shape),
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharp logits and attention: positions and padding matter, ties don't
        model.lm_head.weight.mul_(40.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.save_pretrained(model_dir)


def request(i: int, prompt_len: int, max_new_tokens: int = 12, **params: object) -> PreparedRequest:
    ids = [2 + (i * 7 + k * 3) % (VOCAB - 2) for k in range(prompt_len)]
    options = {"temperature": 0.0, "top_p": 1.0, "seed": None, "stop": ()} | params
    return PreparedRequest(
        f"r{i}", "", ids, GenerationParams(max_new_tokens=max_new_tokens, **options)
    )


def run_all(batcher, arrivals: dict[int, list[PreparedRequest]]) -> dict[str, object]:
    """Step until empty, adding arrivals[k] before step k; return results by request id."""
    results, step = {}, 0
    while step <= max(arrivals) or len(batcher):
        for r in arrivals.get(step, []):
            batcher.add(r, r.id)
        for tag, result in batcher.step():
            results[tag] = result
        assert len(batcher.running) <= batcher.max_batch_size
        step += 1
    return results


def test_staggered_arrivals_give_the_texts_of_one_at_a_time(backend):
    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(12)]
    alone = {r.id: backend.generate([r])[0] for r in requests}
    arrivals = {0: requests[:3], 1: requests[3:4], 5: requests[4:9], 6: requests[9:]}
    results = run_all(backend.continuous(max_batch_size=4, max_batch_tokens=10_000), arrivals)
    assert results == alone
    assert {c.finish_reason for c in alone.values()} <= {"stop", "length"}


@pytest.mark.parametrize("packed_rows", [0, 1, 8])
def test_written_out_and_packed_decode_steps_give_the_texts_of_one_at_a_time(backend, packed_rows):
    """Steps of any row count run on the prepacked weights (laid out for `packed_rows` rows)."""
    from {{ cookiecutter.package_name }}.engine.packing import can_pack

    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(10)]
    alone = {r.id: backend.generate([r])[0] for r in requests}
    batcher = backend.continuous(4, 10_000, packed_rows=packed_rows)
    assert batcher._step is not None  # a plain Llama decodes through the written-out step
    assert run_all(batcher, {0: requests[:5], 3: requests[5:]}) == alone
    assert bool(batcher._step.packed) == (packed_rows > 0 and can_pack(backend.model))


def test_bfloat16_packed_products_are_the_unpacked_ones(backend):
    """In bfloat16 the packed and unpacked products are both oneDNN's: the same texts, bit for
    bit, where this CPU computes bfloat16 (elsewhere both sides decode unpacked)."""
    bf16 = TransformersBackend(backend.model_dir, device="cpu", dtype="bfloat16", num_threads=1)
    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(10)]
    texts = [
        run_all(bf16.continuous(4, 10_000, packed_rows=rows), {0: requests[:5], 2: requests[5:]})
        for rows in (0, 8)
    ]
    assert texts[0] == texts[1]


def test_prompts_that_share_a_system_prompt_prefill_after_it_with_the_same_texts(backend):
    """The second pass finds the prefix the first one's prompts shared and starts after it."""
    from {{ cookiecutter.package_name }}.engine.kv_cache import MIN_PREFIX_TOKENS

    shared = [2 + (k * 5) % (VOCAB - 2) for k in range(MIN_PREFIX_TOKENS + 4)]
    requests = [
        PreparedRequest(
            f"r{i}", "", shared + [2 + (i * 7 + k) % (VOCAB - 2) for k in range(1 + i % 4)],
            GenerationParams(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=None, stop=()),
        )
        for i in range(8)
    ]  # fmt: skip
    alone = {r.id: backend.generate([r])[0] for r in requests}
    batcher = backend.continuous(4, 10_000, packed_rows=8)
    assert run_all(batcher, {0: requests[:2], 3: requests[2:5], 9: requests[5:]}) == alone
    assert batcher._prefix.tokens == shared


def test_the_prefix_cache_keeps_only_what_prompts_share_and_leaves_each_a_token():
    from {{ cookiecutter.package_name }}.engine.kv_cache import PrefixCache

    def layers(n):
        return [[(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]]

    cache = PrefixCache(min_tokens=3)
    cache.learn([[1, 2, 3, 4, 5]], layers(5))
    assert cache.tokens == []  # one prompt alone shares nothing yet
    cache.learn([[1, 2, 3, 4, 9, 9]], layers(6))
    assert cache.tokens == [1, 2, 3, 4] and cache.layers[0][0].shape[2] == 4
    assert cache.covers([[1, 2, 3, 4, 7]]) == 4
    assert cache.covers([[1, 2, 3, 4]]) == 0  # nothing of its own left to give logits
    assert cache.covers([[1, 2, 3, 4, 7], [1, 2, 0, 4, 7]]) == 0
    cache.learn([[1, 2, 3]], layers(3))  # shorter than min_tokens once its last token is kept
    assert cache.tokens == [1, 2, 3, 4]
    broken = layers(6)
    broken[0][0][0][0, 0, 1, 0] = float("nan")
    cache.learn([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 2]], broken)
    assert cache.tokens == [1, 2, 3, 4]  # keys with a NaN are never kept for reuse


def test_a_long_join_is_prefilled_in_chunks_between_decode_steps(backend):
    from {{ cookiecutter.package_name }}.engine.continuous import PREFILL_CHUNK_TOKENS

    length = PREFILL_CHUNK_TOKENS // 2 - 10  # two prompts fit in a chunk, not three
    requests = [request(i, length, max_new_tokens=6) for i in range(5)]
    batcher = backend.continuous(8, 100_000)
    for r in requests:
        batcher.add(r, r.id)
    batcher.step()
    assert len(batcher.running) == 2 and len(batcher.waiting) == 3
    results = run_all(batcher, {0: []})
    assert results == {r.id: backend.generate([r])[0] for r in requests}


def test_another_architecture_decodes_through_its_modules_on_the_same_cache(tmp_path):
    """A model the written-out step does not cover (Qwen2: biased q, k, v) keeps transformers'
    modules, on the same preallocated cache, with the same texts as `generate`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(tmp_path)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_end|>": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>"
    ).save_pretrained(tmp_path)
    tiny = TransformersBackend(tmp_path, device="cpu", dtype="float32", num_threads=1)
    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(8)]
    alone = {r.id: tiny.generate([r])[0] for r in requests}
    batcher = tiny.continuous(3, 10_000, packed_rows=8)
    assert batcher._step is None
    assert run_all(batcher, {0: requests[:4], 2: requests[4:]}) == alone


def test_the_token_budget_bounds_the_running_batch(backend):
    batcher = backend.continuous(max_batch_size=8, max_batch_tokens=3 * 30)
    requests = [request(i, 10, max_new_tokens=20) for i in range(6)]
    for r in requests:
        batcher.add(r, r.id)
    most = 0
    results = {}
    while len(batcher):
        results.update(batcher.step())
        most = max(most, len(batcher.running))
    assert most == 3
    assert results == {r.id: backend.generate([r])[0] for r in requests}


def test_seeded_sampling_does_not_depend_on_the_batchmates(backend):
    seeded = request(1, 6, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = run_all(backend.continuous(4, 10_000), {0: [seeded]})
    crowd = [request(i, 4 + i, max_new_tokens=10, temperature=1.0) for i in range(2, 5)]
    together = run_all(backend.continuous(4, 10_000), {0: crowd, 2: [seeded]})
    assert together["r1"] == alone["r1"]


def test_a_stop_string_ends_the_row_early(backend):
    free = backend.generate([request(3, 5, max_new_tokens=12)])[0]
    words = free.text.split()
    assert len(words) >= 3, "the tiny model must write a few words for this test"
    stopping = request(3, 5, max_new_tokens=12, stop=(words[2],))
    result = run_all(backend.continuous(4, 10_000), {0: [stopping, request(4, 5)]})["r3"]
    assert result.finish_reason == "stop"
    assert words[2] not in result.text.split()


def test_a_request_that_breaks_the_engine_fails_alone(backend):
    broken = PreparedRequest("bad", "", [VOCAB + 5], request(0, 1).params)
    good = [request(i, 4) for i in range(3)]
    results = run_all(backend.continuous(4, 10_000), {0: [*good, broken]})
    assert isinstance(results["bad"], Exception)
    assert [results[r.id] for r in good] == [backend.generate([r])[0] for r in good]


def test_a_join_and_the_running_rows_share_one_pass(backend, monkeypatch):
    """A prompt that joins is prefilled in the pass that decodes the running rows, not in a
    pass of its own that would pause them, with the same texts."""
    batcher = backend.continuous(4, 10_000, packed_rows=8)
    passes, run = [], batcher._step.run

    def counted(decode, prompts):
        rows = 0 if decode is None else len(decode.ids)
        passes.append((rows, len(prompts.ids) if prompts else 0))
        return run(decode, prompts)

    monkeypatch.setattr(batcher._step, "run", counted)
    requests = [request(i, 5 + i, max_new_tokens=12) for i in range(3)]
    results = run_all(batcher, {0: requests[:2], 2: requests[2:]})
    assert passes[:3] == [(0, 2), (2, 0), (2, 1)]  # rows, prompts
    tokens = {tag: completion.completion_tokens for tag, completion in results.items()}
    assert len(passes) == max(tokens["r0"], tokens["r1"], 2 + tokens["r2"])  # one pass a step
    assert results == {r.id: backend.generate([r])[0] for r in requests}


def test_a_prompt_that_breaks_the_pass_it_joins_fails_alone(backend):
    """The pass runs again as its parts: the running rows' step, then each prompt alone."""
    broken = PreparedRequest("bad", "", [VOCAB + 5], request(0, 1).params)
    good = [request(i, 4, max_new_tokens=8) for i in range(3)]
    results = run_all(backend.continuous(4, 10_000), {0: good[:2], 2: [broken, good[2]]})
    assert isinstance(results["bad"], Exception)
    assert [results[r.id] for r in good] == [backend.generate([r])[0] for r in good]


def test_after_a_packed_prefill_only_the_prompts_that_failed_run_again_alone(backend):
    """A prompt whose logits are finite was not reached by a batchmate's NaN: its first token
    (drawn from its generator, if it samples) stands, and a seeded one stays its own."""
    from {{ cookiecutter.package_name }}.engine.prefill import Prefill

    prefill, again = Prefill(backend.model, None), []
    prefill.isolated = lambda rows: again.extend(rows) or ["alone"]
    results = [("kv", 5), FloatingPointError("NaN"), ("kv", 7)]
    assert prefill.again_alone(["a", "b", "c"], results) == [("kv", 5), "alone", ("kv", 7)]
    assert again == ["b"]


def test_a_join_the_cache_cannot_hold_fails_the_batch_and_the_next_requests_are_served(
    backend, monkeypatch
):
    """The slab could not grow (out of memory): the requests in the batch get the error, not
    the thread that generates, and the batch starts again empty for the next ones."""
    batcher = backend.continuous(4, 10_000)
    append = batcher._slab.append
    calls = []

    def short_of_memory(prompts):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise MemoryError("the slab could not grow")
        append(prompts)

    monkeypatch.setattr(batcher._slab, "append", short_of_memory)
    first, second = [request(i, 5, max_new_tokens=10) for i in range(2)]
    later = request(2, 6, max_new_tokens=10)
    results = run_all(batcher, {0: [first], 2: [second], 4: [later]})
    assert isinstance(results["r0"], MemoryError) and isinstance(results["r1"], MemoryError)
    assert results["r2"] == backend.generate([later])[0]
    assert len(batcher) == 0


def test_waiting_requests_can_be_taken_back(backend):
    batcher = backend.continuous(max_batch_size=2, max_batch_tokens=10_000)
    for i in range(5):
        batcher.add(request(i, 4), f"r{i}")
    batcher.step()
    assert batcher.take_waiting() == ["r2", "r3", "r4"]
    assert len(batcher) == 2


def test_a_row_whose_logits_are_nan_fails_alone_and_no_temperature_overflows():
    from {{ cookiecutter.package_name }}.engine.continuous import _Row
    from {{ cookiecutter.package_name }}.engine.sampling import pick

    def row(name: str, temperature: float) -> _Row:
        params = GenerationParams(8, temperature, 1.0, 1, ())
        generator = None if temperature == 0.0 else torch.Generator().manual_seed(1)
        return _Row(name, PreparedRequest(name, "", [2], params), generator)

    rows = [row("nan", 0.0), row("cold", 1e-5), row("greedy", 0.0), row("hot", 2.0)]
    logits = torch.tensor(
        [
            [float("nan"), 0.0, 0.0],
            [1e30, -1e30, 0.0],  # divided by 1e-5 without the max subtracted: overflow
            [0.0, 5.0, 1.0],
            [0.0, 0.0, float("-inf")],
        ]
    )
    picked = pick(logits, rows)
    assert isinstance(picked[0], FloatingPointError)
    assert picked[1:3] == [0, 1]
    assert picked[3] in (0, 1)


def test_a_stop_string_is_found_in_the_decoded_tail_at_the_token_that_completes_it(backend):
    """Decoding only the tail finds each stop string at the same token as decoding everything."""
    from {{ cookiecutter.package_name }}.engine.backend import stop_in_tail

    tokenizer = backend.tokenizer
    ids = [2 + (k * 11 + k * k) % (VOCAB - 2) for k in range(80)]
    text = tokenizer.decode(ids[60:63], skip_special_tokens=True)  # three words, late in the text
    for stops in [(text,), (text.split()[1],), ("nowhere",), (text[:-1], "w47 w47 w47 w47")]:
        whole = [any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stops)
                 for n in range(1, len(ids) + 1)]  # fmt: skip
        tail = [stop_in_tail(tokenizer, ids[:n], stops) for n in range(1, len(ids) + 1)]
        first = whole.index(True) if True in whole else None
        assert (tail.index(True) if True in tail else None) == first


def test_a_stop_string_of_many_byte_tokens_is_found_in_the_tail():
    """Byte-level BPE spends a token per byte where it has no merge: 3 per character here."""
    from tokenizers import decoders

    from {{ cookiecutter.package_name }}.engine.backend import stop_in_tail

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_level = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level)
    stop = "日本語で止まる"  # 7 characters, 21 tokens
    ids = tokenizer.encode(f"a b c {stop} d e", add_special_tokens=False)
    found = [stop_in_tail(tokenizer, ids[:n], (stop,)) for n in range(1, len(ids) + 1)]
    assert found.index(True) == len(tokenizer.encode(f"a b c {stop}")) - 1


def test_batchers_on_one_model_share_its_packed_weights_and_an_unpacked_one_frees_them(backend):
    from {{ cookiecutter.package_name }}.engine.packing import PACKED, can_pack

    if not can_pack(backend.model):
        pytest.skip("this torch has no oneDNN: nothing is packed")  # every x86 and Arm build has
    first, second = (backend.continuous(4, 10_000, packed_rows=8) for _ in range(2))
    first._step.pack()
    second._step.pack()
    assert first._step.packed is second._step.packed  # one packed copy, not one per batcher
    # per layer: query-key-value, output, gate-up, down; then the output layer
    assert len(first._step.packed) == 4 * backend.model.config.num_hidden_layers + 1
    backend.continuous(4, 10_000, packed_rows=0)
    assert PACKED not in backend.model.__dict__  # the copy is freed
