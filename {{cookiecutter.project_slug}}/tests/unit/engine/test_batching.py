import pytest

from {{ cookiecutter.package_name }}.engine.batching import DynamicBatcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **overrides) -> DynamicBatcher[str]:
    options = {"max_batch_size": 4, "max_wait_s": 0.05, "max_batch_tokens": 1000}
    return DynamicBatcher(**(options | overrides), clock=clock)


def test_nothing_is_due_before_the_wait_when_the_batch_is_not_full():
    clock = FakeClock()
    batcher = make(clock)
    batcher.add("a", 10)
    clock.advance(0.049)
    assert batcher.pop_batch() == []
    assert batcher.seconds_until_due() == pytest.approx(0.001)


def test_the_oldest_waiting_past_max_wait_releases_a_partial_batch():
    clock = FakeClock()
    batcher = make(clock)
    batcher.add("a", 10)
    clock.advance(0.03)
    batcher.add("b", 10)
    clock.advance(0.025)
    assert batcher.pop_batch() == ["a", "b"]
    assert len(batcher) == 0
    assert batcher.seconds_until_due() is None


def test_a_full_batch_is_due_at_once_and_takes_at_most_max_batch_size():
    clock = FakeClock()
    batcher = make(clock, sort_by_length=False)
    for name in "abcdef":
        batcher.add(name, 10)
    assert batcher.seconds_until_due() == 0.0
    assert batcher.pop_batch() == ["a", "b", "c", "d"]
    assert batcher.pop_batch() == []  # two left, not full, not old
    clock.advance(0.06)
    assert batcher.pop_batch() == ["e", "f"]


def test_sorting_waits_for_two_batches_worth_to_choose_companions_by_length():
    clock = FakeClock()
    batcher = make(clock, max_batch_size=2)
    for name, tokens in [("a10", 10), ("b90", 90), ("c91", 91)]:
        batcher.add(name, tokens)
    assert batcher.pop_batch() == []  # 3 waiting: less than two batches' worth, not old yet
    batcher.add("d11", 11)
    assert batcher.pop_batch() == ["a10", "d11"]  # not the first arrivals a10 + b90
    assert batcher.pop_batch() == []
    clock.advance(0.06)
    assert batcher.pop_batch() == ["b90", "c91"]


def test_the_token_budget_counts_padding_and_closes_the_batch():
    clock = FakeClock()
    batcher = make(clock, max_batch_tokens=300, sort_by_length=False)
    batcher.add("short", 10)
    batcher.add("long", 140)  # padded cost: 2 x 140 = 280 < 300
    assert batcher.pop_batch() == []
    batcher.add("third", 20)  # 3 x 140 = 420 > 300: due, and only two fit
    assert batcher.pop_batch() == ["short", "long"]
    assert batcher.drain() == [["third"]]


def test_an_item_over_the_budget_alone_still_goes_out_alone():
    clock = FakeClock()
    batcher = make(clock, max_batch_tokens=50)
    batcher.add("huge", 80)
    batcher.add("small", 5)
    assert batcher.pop_batch() == ["huge"]
    assert batcher.drain() == [["small"]]


def test_sorting_by_length_groups_similar_lengths_and_keeps_the_oldest_first():
    clock = FakeClock()
    batcher = make(clock, max_batch_size=3)
    for name, tokens in [("a10", 10), ("b100", 100), ("c12", 12), ("d98", 98), ("e11", 11)]:
        batcher.add(name, tokens)
    batcher.add("f99", 99)
    assert batcher.pop_batch() == ["a10", "c12", "e11"]
    clock.advance(0.06)  # three left: not two batches' worth any more, so the wait decides
    assert batcher.pop_batch() == ["b100", "d98", "f99"]


def test_without_sorting_batches_are_first_in_first_out():
    clock = FakeClock()
    batcher = make(clock, max_batch_size=3, sort_by_length=False)
    for name, tokens in [("a10", 10), ("b100", 100), ("c12", 12), ("d98", 98)]:
        batcher.add(name, tokens)
    assert batcher.pop_batch() == ["a10", "b100", "c12"]


def test_the_oldest_item_is_never_starved_by_a_stream_of_better_fits():
    clock = FakeClock()
    batcher = make(clock, max_batch_size=2)
    batcher.add("odd-one", 500)
    for i in range(10):
        batcher.add(f"fit-{i}", 10)
        batch = batcher.pop_batch()
        if "odd-one" in batch:
            break
    assert "odd-one" in batch


def test_drain_returns_everything_in_batches():
    batcher = make(FakeClock(), max_batch_size=2)
    for name in "abcde":
        batcher.add(name, 1)
    assert [len(b) for b in batcher.drain()] == [2, 2, 1]
    assert len(batcher) == 0


@pytest.mark.parametrize(
    "bad", [{"max_batch_size": 0}, {"max_batch_tokens": 0}, {"max_wait_s": -1.0}]
)
def test_invalid_limits_are_refused(bad):
    with pytest.raises(ValueError):
        make(FakeClock(), **bad)
