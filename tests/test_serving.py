"""The engine's bounds: a full queue answers 503, and a failing batch fails its requests only."""

import threading
import time

import fastapi.testclient
import pytest

from bloom_jax import serving


class Vocabulary:
    """Whitespace words "w<id>"; id 2 is EOS, 3 padding."""

    eos_id, pad_id = 2, 3

    def encode(self, text):
        return [int(word[1:]) for word in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


class StuckGenerator:
    """A generator whose decode waits for `release`, or fails once released with `fail`."""

    rows_multiple = 1

    def __init__(self, fail=False):
        self.release, self.fail = threading.Event(), fail
        self.started = threading.Event()

    def start(self, *args):
        self.started.set()
        self.release.wait(timeout=60)
        raise RuntimeError("device lost") if self.fail else NotImplementedError


@pytest.fixture
def stuck():
    generator = StuckGenerator(fail=True)
    engine = serving.Engine(generator, None, Vocabulary(), context=32, max_batch=1, max_queue=1)
    yield generator, engine, fastapi.testclient.TestClient(serving.create_app(engine, "stuck"))
    generator.release.set()


def test_a_full_queue_answers_503_and_a_failed_batch_fails_only_its_requests(stuck):
    generator, engine, client = stuck
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2})))
        for i in range(2)]
    threads[0].start()
    assert generator.started.wait(timeout=60)  # the engine holds request 0
    threads[1].start()  # request 1 fills the queue
    for _ in range(600):
        if engine.jobs.full():
            break
        time.sleep(0.1)
    full = client.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2})
    assert full.status_code == 503 and "queue is full" in full.json()["error"]["message"]
    generator.release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert [results[i].status_code for i in range(2)] == [500, 500]
    assert "device lost" in results[1].json()["error"]["message"]
    assert client.get("/health").status_code == 200
