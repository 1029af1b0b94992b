"""Fixtures of the serving tests: `serve` processes, stopped whatever the test did."""

import pytest

from .test_http import Server


@pytest.fixture
def servers(tmp_path):
    """start(*args, **settings) -> a `serve` process of this test; all stop afterwards."""
    started: list[Server] = []

    def start(*args: str, **settings: object) -> Server:
        started.append(Server(tmp_path, *args, **settings))
        return started[-1]

    yield start
    for served in started:
        served.stop()
