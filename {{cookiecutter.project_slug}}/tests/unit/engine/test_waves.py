"""The overlapping-batches scheduler (engine/waves.py), on an engine that decodes in real time on
threads of its own, as CTranslate2 does; the real engine is in the integration tests."""

import threading
import time

import pytest

from {{ cookiecutter.package_name }}.engine.backend import Cancelled, Completion
from {{ cookiecutter.package_name }}.engine.prompts import (
    GenerationParams,
    PreparedRequest,
)
from {{ cookiecutter.package_name }}.engine.waves import WaveScheduler

STEP_S = 0.01


def prepared(name: str, tokens: int) -> PreparedRequest:
    """A request whose reply is its prompt: `tokens` tokens, one per step of the engine."""
    params = GenerationParams(tokens, 0.0, 1.0, None, ())
    return PreparedRequest(name, "", list(range(2, 2 + tokens)), params)


class Paced:
    """Decodes each request's prompt back, one token a step, STEP_S a step; several batches may
    run at once (each on its caller's thread). Records each batch and the most at once."""

    streams = True

    def __init__(self, fail_on: str = "", die_on: str = "") -> None:
        self.batches: list[list[str]] = []
        self.active = self.most = 0
        self.lock = threading.Lock()
        self.fail_on, self.die_on = fail_on, die_on

    def generate(self, batch, on_token=None):
        names = [r.id for r in batch]
        with self.lock:
            self.batches.append(names)
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            if self.die_on in names:
                raise SystemExit("the engine thread died")
            if self.fail_on in names:
                raise RuntimeError("the engine failed")
            sent, live = [0] * len(batch), [True] * len(batch)
            for step in range(max(len(r.token_ids) for r in batch)):
                if not any(live):  # every row stopped: the batch ends, as CTranslate2's does
                    break
                time.sleep(STEP_S)
                for i, r in enumerate(batch):
                    if live[i] and step < len(r.token_ids):
                        live[i] = not on_token(i, r.token_ids[step])
                        sent[i] += live[i]
            return [Completion(str(n), "length", 1, n) for n in sent]
        finally:
            with self.lock:
                self.active -= 1


def drive(scheduler, arrivals: dict[float, list[PreparedRequest]]) -> list[tuple[str, object]]:
    """Step until empty, adding each arrival once its time (seconds from now) has come; return
    the results in the order they came back."""
    started, order = time.monotonic(), []
    pending = sorted(arrivals.items())
    while pending or len(scheduler):
        while pending and time.monotonic() - started >= pending[0][0]:
            for r in pending.pop(0)[1]:
                scheduler.add(r, r.id)
        order += scheduler.step()
        assert time.monotonic() - started < 10, "the scheduler did not finish"
    return order


def test_an_arrival_starts_on_a_free_lane_while_a_batch_decodes():
    engine = Paced()
    scheduler = WaveScheduler(engine, lanes=2, max_batch_size=8, max_batch_tokens=10_000)
    order = drive(scheduler, {0: [prepared("long", 40)], 0.05: [prepared("short", 3)]})
    assert [tag for tag, _ in order] == ["short", "long"]  # it did not wait for the long one
    assert engine.batches == [["long"], ["short"]] and engine.most == 2
    assert order[1][1].completion_tokens == 40


def test_one_lane_runs_one_batch_at_a_time_without_holding_its_caller():
    engine = Paced()
    scheduler = WaveScheduler(engine, lanes=1, max_batch_size=8, max_batch_tokens=10_000)
    scheduler.add(prepared("long", 40), "long")
    began = time.monotonic()
    assert scheduler.step() == [] and len(scheduler.running) == 1
    assert time.monotonic() - began < 0.3  # not the batch's 0.4 s
    order = drive(scheduler, {0: [prepared("short", 3)]})
    assert [tag for tag, _ in order] == ["long", "short"] and engine.most == 1


def test_requests_due_together_are_spread_over_the_free_lanes():
    engine = Paced()
    scheduler = WaveScheduler(engine, lanes=2, max_batch_size=8, max_batch_tokens=10_000)
    drive(scheduler, {0: [prepared(f"r{i}", 5) for i in range(7)]})
    assert [len(batch) for batch in engine.batches] == [4, 3]


def test_a_lone_request_waits_for_company_up_to_max_wait():
    engine = Paced()
    scheduler = WaveScheduler(
        engine, lanes=1, max_batch_size=3, max_batch_tokens=10_000, max_wait_s=0.2
    )
    drive(scheduler, {0: [prepared("a", 2)], 0.05: [prepared("b", 2)]})
    assert engine.batches == [["a", "b"]]  # b arrived within a's wait: one batch


def test_a_stopped_request_ends_alone_as_cancelled():
    engine = Paced()
    scheduler = WaveScheduler(engine, lanes=1, max_batch_size=4, max_batch_tokens=10_000)
    heard: dict[str, int] = {}

    def on_token(tag: str, token: int) -> bool:
        heard[tag] = heard.get(tag, 0) + 1
        return tag == "b" and heard[tag] == 2  # b's client goes away at its second token

    scheduler.on_token = on_token
    results = dict(drive(scheduler, {0: [prepared("a", 6), prepared("b", 6)]}))
    assert isinstance(results["b"], Cancelled) and heard["b"] == 2
    assert results["a"].completion_tokens == 6 and heard["a"] == 6


def test_a_failed_batch_runs_each_request_alone_and_only_the_culprit_fails():
    engine = Paced(fail_on="bad", die_on="fatal")
    scheduler = WaveScheduler(engine, lanes=1, max_batch_size=3, max_batch_tokens=10_000)
    results = dict(drive(scheduler, {0: [prepared(n, 2) for n in ("good", "bad", "fine")]}))
    assert isinstance(results["bad"], RuntimeError)
    assert results["good"].completion_tokens == results["fine"].completion_tokens == 2
    assert engine.batches == [["good", "bad", "fine"], ["good"], ["bad"], ["fine"]]
    scheduler.add(prepared("fatal", 2), "fatal")
    with pytest.raises(SystemExit, match="died"):  # the generation loop dies: it exits non-zero
        drive(scheduler, {})


def test_a_request_that_streamed_is_not_run_again_when_its_batch_fails():
    class FailsLate(Paced):
        def generate(self, batch, on_token=None):
            if len(batch) > 1:
                on_token(0, 7)  # the first request's text has begun
                raise RuntimeError("the engine failed")
            return super().generate(batch, on_token)

    engine = FailsLate()
    scheduler = WaveScheduler(engine, lanes=1, max_batch_size=2, max_batch_tokens=10_000)
    results = dict(drive(scheduler, {0: [prepared("a", 2), prepared("b", 2)]}))
    assert isinstance(results["a"], RuntimeError) and results["b"].completion_tokens == 2
    assert engine.batches == [["b"]]  # only b ran again


def test_closing_stops_the_batches_in_flight_and_waits_for_them():
    engine = Paced()
    scheduler = WaveScheduler(engine, lanes=2, max_batch_size=1, max_batch_tokens=10_000)
    for name in ("a", "b", "c"):
        scheduler.add(prepared(name, 100), name)  # 1 s each
    scheduler.step()
    began = time.monotonic()
    scheduler.close()
    assert time.monotonic() - began < 0.5 and engine.active == 0
    assert not scheduler.waves and not scheduler.waiting and engine.most == 2


def test_an_engine_error_fails_its_batch_only_and_a_dead_thread_reaches_the_caller():
    engine = Paced(fail_on="bad", die_on="fatal")
    scheduler = WaveScheduler(engine, lanes=2, max_batch_size=1, max_batch_tokens=10_000)
    results = dict(drive(scheduler, {0: [prepared("bad", 2), prepared("good", 2)]}))
    assert isinstance(results["bad"], RuntimeError) and results["good"].completion_tokens == 2
    scheduler.add(prepared("fatal", 2), "fatal")
    with pytest.raises(SystemExit, match="died"):  # the generation loop dies: it exits non-zero
        drive(scheduler, {})


def test_waiting_requests_are_taken_back_and_the_running_ones_finish():
    engine = Paced()
    scheduler = WaveScheduler(engine, lanes=1, max_batch_size=1, max_batch_tokens=10_000)
    for name in ("a", "b", "c"):
        scheduler.add(prepared(name, 3), name)
    scheduler.step()
    assert scheduler.take_waiting() == ["b", "c"] and scheduler.running == ["a"]
    assert [tag for tag, _ in drive(scheduler, {})] == ["a"]
