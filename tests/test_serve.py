"""The server, started for real on 127.0.0.1 and asked over HTTP: completions (streamed or not)
equal `generate`'s greedy ones, 32 concurrent clients are each answered, and bad requests get a
400 that leaves the server answering."""

import concurrent.futures
import json
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from bloom_jax import decoding
from tests import forked_commands
from tests.test_generate import saved_hf_model

CONTEXT = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, tokenizer, config, params) of a server on a random-weight BLOOM."""
    hf_dir = tmp_path_factory.mktemp("hf")
    _, config, params, tokenizer = saved_hf_model(hf_dir)
    port = free_port()
    proc = forked_commands.start(["serve", f"--hf_dir={hf_dir}", f"--port={port}",
                                  f"--context={CONTEXT}", "--max_batch=16"], hf_dir / "server.log")
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to 5 minutes to start
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        proc.kill()
    assert proc.poll() is None, (hf_dir / "server.log").read_text()[-3000:]
    yield url, tokenizer, config, params
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def expected_texts(server, prompts: list[str], max_tokens: list[int]) -> list[str]:
    """`generate`'s greedy continuations of `prompts`, each up to its EOS or `max_tokens`: one
    left-padded batch (greedy text is the same alone or in a batch, and its first n tokens are
    the n-token answer)."""
    _, tokenizer, config, params = server
    ids, mask = decoding.left_pad([tokenizer.encode(p).ids for p in prompts], decoding.PAD_ID)
    out = decoding.generate_ids(config, params, ids, max(max_tokens), attention_mask=mask,
                                eos_token_id=None)
    texts = []
    for new, n in zip(np.asarray(out)[:, ids.shape[1]:].tolist(), max_tokens):
        new = new[:n]
        new = new[:new.index(decoding.EOS_ID)] if decoding.EOS_ID in new else new
        texts.append(tokenizer.decode(new, skip_special_tokens=False))
    return texts


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


@pytest.mark.slow
def test_greedy_completion_is_generates(server):
    url = server[0]
    answer = complete(url, prompt="w10 w200 w31", max_tokens=6, temperature=0)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_texts(server, ["w10 w200 w31"], [6])[0]
    assert body["usage"]["prompt_tokens"] == 3
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.slow
def test_streamed_completion_sends_the_same_text_as_events(server):
    url = server[0]
    request = dict(prompt="w99 w5", max_tokens=8, temperature=0)
    with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True},
                      timeout=300) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in answer.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert len(chunks) > 2  # text came in pieces, then the finish
    assert "".join(c["text"] for c in chunks) == complete(url, **request).json()["choices"][0][
        "text"]
    assert chunks[-1]["finish_reason"] is not None


@pytest.mark.slow
def test_32_concurrent_clients_get_generates_answers(server):
    url = server[0]
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(4, 256, rng.integers(1, 9)))
               for _ in range(32)]
    max_tokens = [int(n) for n in rng.integers(1, 10, 32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda p, n: complete(url, prompt=p, max_tokens=n,
                                                      temperature=0), prompts, max_tokens))
    assert [a.status_code for a in answers] == [200] * 32
    assert [a.json()["choices"][0]["text"] for a in answers] == expected_texts(
        server, prompts, max_tokens)


@pytest.mark.slow
def test_a_stop_string_ends_the_text_before_it(server):
    url = server[0]
    full = complete(url, prompt="w10 w200 w31", max_tokens=8, temperature=0).json()
    words = full["choices"][0]["text"].split(" ")
    stop = " " + words[3]
    answer = complete(url, prompt="w10 w200 w31", max_tokens=8, temperature=0, stop=[stop])
    text = answer.json()["choices"][0]["text"]
    assert text == full["choices"][0]["text"][:full["choices"][0]["text"].index(stop)]
    assert answer.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_sampling_follows_the_seed(server):
    url = server[0]
    request = dict(prompt="w10 w11", max_tokens=8, temperature=1.5, top_p=0.95, top_k=50)
    texts = [complete(url, **request, seed=seed).json()["choices"][0]["text"]
             for seed in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.slow
@pytest.mark.parametrize("body,problem", [
    (b"{not json", "Invalid JSON"),
    (b'{"max_tokens": 4}', "prompt"),
    (json.dumps({"prompt": "w5", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"prompt": "w5", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "w5", "max_tokens": "many"}).encode(), "max_tokens"),
    (json.dumps({"prompt": " ".join(["w5"] * CONTEXT)}).encode(), "exceed the context"),
    (json.dumps({"prompt": "", "max_tokens": 2}).encode(), "no tokens"),
], ids=["malformed_json", "no_prompt", "negative_temperature", "zero_top_p", "text_max_tokens",
        "longer_than_context", "empty_prompt"])
def test_bad_requests_get_a_400_and_the_server_answers_after(server, body, problem):
    url = server[0]
    answer = httpx.post(f"{url}/v1/completions", content=body,
                        headers={"Content-Type": "application/json"}, timeout=60)
    assert answer.status_code == 400
    assert problem in answer.json()["error"]["message"]
    assert complete(url, prompt="w7", max_tokens=2, temperature=0).status_code == 200


@pytest.mark.slow
def test_health_and_models(server):
    url = server[0]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
