"""Streaming: text deltas that add up to the final text, and requests stopped mid-way by the
caller, on both schedulers."""

from {{ cookiecutter.package_name }}.engine.backend import Cancelled, Completion
from {{ cookiecutter.package_name }}.engine.streaming import StaticStreamer, TextStream

from .test_continuous import backend, request  # noqa: F401 - the tiny model fixture

EOS = {1}


class Letters:
    """A tokenizer whose token i is one character; 0xff stands for half of a UTF-8 character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = "".join("\ufffd" if i == 0xFF else chr(i) for i in ids if i not in EOS)
        return text.replace("\ufffd\u00e9", "\u00e9")  # 0xff then é: one character


def pieces(stream: TextStream, text: str) -> list[str]:
    return [stream.push(ord(c)) for c in text]


def test_deltas_hold_back_what_may_become_a_stop_string():
    stream = TextStream(Letters(), ("END",), EOS)
    deltas = pieces(stream, "abcEN")
    assert "".join(deltas) == "abc"  # "EN" may yet be "END"
    assert "".join(deltas + pieces(stream, "x")) == "abcENx"
    assert stream.finish("abcENx") == ""


def test_the_final_text_completes_the_deltas():
    stream = TextStream(Letters(), ("END",), EOS)
    sent = "".join(pieces(stream, "hello EN"))
    assert sent + stream.finish("hello ") == "hello "  # stopped at "END": the rest is dropped


def test_no_delta_ends_inside_a_character():
    stream = TextStream(Letters(), (), EOS)
    assert stream.push(ord("a")) == "a"
    assert stream.push(0xFF) == ""
    assert stream.push(0xE9) == "\u00e9"
    assert stream.push(1) == ""  # end of sequence: no text


def test_continuous_deltas_add_up_and_a_stopped_request_leaves_at_once(backend):  # noqa: F811
    batcher = backend.continuous(max_batch_size=4, max_batch_tokens=10_000)
    requests = [request(i, 4 + i, max_new_tokens=16) for i in range(3)]
    alone = {r.id: backend.generate([r])[0] for r in requests}
    streams = {r.id: TextStream(backend.tokenizer, (), backend.eos_ids) for r in requests}
    sent = {r.id: "" for r in requests}
    heard = {r.id: 0 for r in requests}

    def on_token(tag: str, token: int) -> bool:
        heard[tag] += 1
        sent[tag] += streams[tag].push(token)
        return tag == "r1" and heard[tag] > 3

    batcher.on_token = on_token
    for r in requests:
        batcher.add(r, r.id)
    results = {}
    while len(batcher):
        results.update(batcher.step())
    assert isinstance(results["r1"], Cancelled) and heard["r1"] == 4
    for tag in ("r0", "r2"):
        assert results[tag] == alone[tag]
        assert sent[tag] + streams[tag].finish(alone[tag].text) == alone[tag].text


class Streaming:
    """A backend that streams: each request's tokens are its prompt ids, one per step."""

    tokenizer = Letters()
    streams = True

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, batch, on_token=None):
        self.batches.append(len(batch))
        done = [0] * len(batch)
        for step in range(max(len(r.token_ids) for r in batch)):
            for i, r in enumerate(batch):
                if (
                    step < len(r.token_ids)
                    and done[i] == step
                    and not on_token(i, r.token_ids[step])
                ):
                    done[i] += 1
        return [
            Completion(self.tokenizer.decode(r.token_ids[:n]), "length", 1, n)
            for r, n in zip(batch, done, strict=True)
        ]


def test_static_batches_stream_and_stop_one_request():
    engine = Streaming()
    streamer = StaticStreamer(engine, max_batch_size=2, max_batch_tokens=10_000)
    heard: dict[str, list[int]] = {}
    started = []
    streamer.on_start = started.append
    streamer.on_token = lambda tag, token: heard.setdefault(tag, []).append(token) or tag == "b"
    for name, text in (("a", "xyz"), ("b", "pqrs"), ("c", "k")):
        r = request(0, 1)
        streamer.add(type(r)(name, "", [ord(ch) for ch in text], r.params), name)
    first = dict(streamer.step())
    assert started == ["a", "b"] and engine.batches == [2]
    assert first["a"].text == "xyz" and isinstance(first["b"], Cancelled)
    assert heard["b"] == [ord("p")]  # stopped at its first token
    assert dict(streamer.step())["c"].text == "k" and not len(streamer)


def test_a_static_batch_waits_for_company_up_to_max_wait():
    import time

    streamer = StaticStreamer(
        Streaming(), max_batch_size=3, max_batch_tokens=10_000, max_wait_s=0.2
    )
    r = request(0, 1)
    streamer.add(type(r)("a", "", [ord("x")], r.params), "a")
    assert streamer.step() == [] and len(streamer.waiting) == 1  # alone, and not yet due
    time.sleep(0.2)
    assert [tag for tag, _ in streamer.step()] == ["a"]
    for name in "bcd":
        streamer.add(type(r)(name, "", [ord("x")], r.params), name)
    assert [tag for tag, _ in streamer.step()] == ["b", "c", "d"]  # a full batch goes at once
