"""State every test starts from: no gin config, and pytest's own signal handlers (the trainer
installs SIGTERM / SIGINT handlers for preemption)."""

import signal

import gin
import pytest


@pytest.fixture(autouse=True)
def clean_gin_and_signals():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    gin.clear_config()
    yield
    gin.clear_config()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
