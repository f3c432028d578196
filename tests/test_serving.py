"""The engine's bounds: a full queue answers 503, and a failing batch fails its requests only."""

import threading
import time
import types

import fastapi.testclient
import pytest

from bloom_jax import serving
from bloom_jax.data import vocabularies


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


class Recorded(serving.Job):
    """A job that keeps its events in a list."""

    def send(self, *event):
        self.events.append(event)


def fed(engine, ids, **request):
    """The events of a job fed `ids` one by one, as the engine feeds decoded tokens."""
    job = Recorded([5], serving.CompletionRequest(prompt="x", **request), None, [])
    for token in ids:
        if not job.finished:
            engine._append(job, token)  # pylint: disable=protected-access
    return job.events


@pytest.mark.parametrize("stream", [True, False])
def test_text_is_decoded_incrementally_and_equals_the_whole_decode(stream):
    """SentencePiece pieces with leading spaces and characters split over byte pieces: the text
    sent piece by piece is the whole decode, each step decodes a few tokens only, and a stop
    string cuts it (also one that spans several tokens)."""
    vocabulary = vocabularies.load_vocabulary()
    decoded = []
    engine = serving.Engine(StuckGenerator(), None, vocabulary, context=4096)
    engine.vocabulary = types.SimpleNamespace(
        eos_id=vocabulary.eos_id, decode=lambda ids: decoded.append(len(ids)) or
        vocabulary.decode(ids))
    text = "Les modèles de langue 大语言模型 😀 apprennent, et les modèles écrivent. " * 8
    ids = [i for i in vocabulary.encode(text) if i != vocabulary.eos_id]
    whole = vocabulary.decode(ids)
    events = fed(engine, ids, max_tokens=len(ids), stream=stream)
    assert "".join(e[1] for e in events if e[0] == "text") == whole
    assert events[-1] == ("end", "length", len(ids))
    if stream:
        assert len(events) > len(ids) // 4 and max(decoded) <= 8
    stop = "et les mod"
    events = fed(engine, ids, max_tokens=len(ids), stream=stream, stop=["zzz", stop])
    assert "".join(e[1] for e in events if e[0] == "text") == whole[:whole.index(stop)]
    assert events[-1][:2] == ("end", "stop")
