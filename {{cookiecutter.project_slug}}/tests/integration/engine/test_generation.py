"""The real bundled model through the backend and the service: correctness of batching."""

import pytest

from {{ cookiecutter.package_name }}.engine.prompts import PreparedRequest
from {{ cookiecutter.package_name }}.engine.service import Admitted
from {{ cookiecutter.package_name }}.messages import Reply

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the moon.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "Explain what a CPU does, in detail, as if to a curious ten year old child.",
    "2+2=?",
    "What language is spoken in Brazil?",
]


def admit(service, raw: dict) -> Admitted:
    admitted = service.admit(raw, raw.get("id", "x"))
    assert isinstance(admitted, Admitted), admitted
    return admitted


def answer(service, raw: dict) -> Reply:
    return service.run([admit(service, raw)])[0]


def test_the_capital_of_france_is_paris(service):
    reply = answer(service, {"id": "fr", "prompt": "What is the capital of France?"})
    assert reply.error is None
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_batched_greedy_outputs_equal_one_at_a_time_outputs(service):
    requests = [{"id": f"p{i}", "prompt": p, "max_new_tokens": 32} for i, p in enumerate(PROMPTS)]
    alone = [answer(service, r).text for r in requests]
    together = service.run([admit(service, r) for r in requests])
    assert [r.id for r in together] == [r["id"] for r in requests]
    assert [r.text for r in together] == alone
    # The prompts differ in length, so the batch was padded: the masks did their job.
    lengths = {len(admit(service, r).request.token_ids) for r in requests}
    assert len(lengths) > 1


def test_each_request_keeps_its_own_max_new_tokens_inside_one_batch(service):
    story = "Tell me a long story about a dragon."
    batch = [
        admit(service, {"id": "short", "prompt": story, "max_new_tokens": 5}),
        admit(service, {"id": "long", "prompt": story, "max_new_tokens": 40}),
    ]
    short, long = service.run(batch)
    assert (short.finish_reason, short.usage.completion_tokens) == ("length", 5)
    assert long.usage.completion_tokens > 5
    assert long.text.startswith(short.text)


def test_a_stop_string_ends_the_text_before_it(service):
    raw = {"id": "s", "prompt": "What is the capital of France?"}
    full = answer(service, raw).text
    assert "Paris" in full  # the premise
    stopped = answer(service, raw | {"stop": ["Paris", "never-seen"]})
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index("Paris")]
    assert stopped.usage.completion_tokens < answer(service, raw).usage.completion_tokens


def test_seeded_sampling_is_reproducible_whatever_the_batchmates(service):
    raw = {"id": "s", "prompt": "Invent a name for a cat.", "temperature": 1.0, "seed": 1234}
    first = answer(service, raw).text
    mates = [admit(service, {"id": f"m{i}", "prompt": p}) for i, p in enumerate(PROMPTS[:3])]
    in_batch = service.run([*mates, admit(service, raw)])[-1].text
    assert first == in_batch


def test_sampling_without_a_seed_varies(service):
    raw = {
        "id": "s",
        "prompt": "Invent a name for a cat.",
        "temperature": 1.5,
        "max_new_tokens": 24,
    }
    texts = {answer(service, raw).text for _ in range(4)}
    assert len(texts) > 1


def test_a_prompt_over_the_context_window_gets_a_clear_error(service, backend):
    words = "lorem ipsum " * backend.context_window
    reply = service.admit({"id": "huge", "prompt": words}, "huge")
    assert isinstance(reply, Reply)
    assert reply.error is not None and reply.error.type == "context_length_exceeded"
    assert f"context window of {backend.context_window} tokens" in reply.error.message


def test_a_request_that_breaks_the_engine_fails_alone(service):
    good = [
        admit(service, {"id": f"g{i}", "prompt": p, "max_new_tokens": 8})
        for i, p in enumerate(PROMPTS[:3])
    ]
    # A token id far outside any vocabulary: every engine fails on it.
    poison_request = PreparedRequest("poison", "", [10**9], good[0].request.params)
    poison = Admitted(poison_request, good[0].received)
    replies = service.run([good[0], poison, good[1], good[2]])
    assert [r.id for r in replies] == ["g0", "poison", "g1", "g2"]
    assert replies[1].error is not None and replies[1].error.type == "generation_failed"
    assert all(r.error is None and r.text for r in (replies[0], *replies[2:]))


@pytest.fixture(scope="module")
def hf_service(settings, service):
    """The service on transformers (the configured engine may be another)."""
    if service.backend.name == "transformers":
        return service
    from {{ cookiecutter.package_name }}.engine.service import InferenceService
    from {{ cookiecutter.package_name }}.lifecycle.loading import load_backend

    transformers = settings.model_copy(update={"backend": "transformers"})
    return InferenceService.from_settings(transformers, load_backend(transformers))


def test_continuous_batching_gives_the_texts_of_one_at_a_time(hf_service, settings):
    requests = [
        {"id": f"p{i}", "prompt": p, "max_new_tokens": 8 + 6 * (i % 4)}
        for i, p in enumerate(PROMPTS)
    ]
    alone = {r["id"]: answer(hf_service, r) for r in requests}
    batcher = hf_service.continuous(settings.model_copy(update={"max_batch_size": 3}))
    # Requests arrive while others decode: three at once, then one every other step.
    arrivals = {0: requests[:3], **{2 * k: [r] for k, r in enumerate(requests[3:], 1)}}
    replies, step, most = {}, 0, 0
    while step <= max(arrivals) or len(batcher):
        for raw in arrivals.get(step, []):
            admitted = admit(hf_service, raw)
            batcher.add(admitted.request, admitted)
        for admitted, result in batcher.step():
            replies[admitted.request.id] = hf_service.reply(admitted, result)
        most = max(most, len(batcher.running))
        step += 1
    assert most == 3
    assert {i: r.text for i, r in replies.items()} == {i: r.text for i, r in alone.items()}
    assert {i: r.usage for i, r in replies.items()} == {i: r.usage for i, r in alone.items()}
