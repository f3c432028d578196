"""Fixtures for every test: each starts and ends with an empty gin config and pytest's own
SIGTERM / SIGINT handlers (the trainer and distributed.initialize install theirs). And the
number of pytest-xdist workers `--numprocesses=auto` starts."""

import os
import signal

import gin
import pytest


@pytest.fixture(autouse=True)
def clean_gin_and_signals():
    """Clears gin before and after the test; puts back the SIGTERM / SIGINT handlers it found."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    gin.clear_config()
    yield
    gin.clear_config()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def pytest_xdist_auto_num_workers(config):
    """One worker more than cores (at most 4): many tests spend their time waiting on the
    training processes they start, and a third worker fills 2 cores while two wait."""
    del config
    return min(4, (os.cpu_count() or 1) + 1)
