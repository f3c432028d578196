"""`python -m bloom_jax.serve_bench`: requests/s and tokens/s of a running server, by clients.

    python -m bloom_jax.serve_bench --url=http://127.0.0.1:8000 --clients=1,16 --requests=64

Each client sends greedy completions of `--max_tokens` tokens one after another until
`--requests` have been answered in all, twice: the first round (which compiles the batch
shapes that come) is not timed.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request
from collections.abc import Sequence

from absl import flags

from bloom_jax import configs

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("url", "http://127.0.0.1:8000", "The server's base URL.")
    flags.DEFINE_list("clients", ["1", "16"], "Concurrent clients to measure, in turn.")
    flags.DEFINE_integer("requests", 64, "Requests per measurement.")
    flags.DEFINE_integer("max_tokens", 32, "Tokens per completion.")
    flags.DEFINE_string("prompt", "Les modèles de langue", "The prompt of every request.")


def complete(url: str, prompt: str, max_tokens: int) -> int:
    """Sends one greedy completion; returns its completion tokens."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stop": []}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.load(answer)["usage"]["completion_tokens"]


def measure(url: str, clients: int, requests: int, prompt: str,
            max_tokens: int) -> tuple[float, float]:
    """(requests/s, completion tokens/s) with `clients` concurrent clients."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        send = lambda _: complete(url, prompt, max_tokens)
        list(pool.map(send, range(requests)))  # warm-up: compiles the batch sizes that come
        start = time.perf_counter()
        tokens = sum(pool.map(send, range(requests)))
        elapsed = time.perf_counter() - start
    return requests / elapsed, tokens / elapsed


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    for clients in map(int, FLAGS.clients):
        per_s, tokens_per_s = measure(FLAGS.url, clients, FLAGS.requests, FLAGS.prompt,
                                      FLAGS.max_tokens)
        print(f"{clients:3d} clients | {per_s:8.2f} requests/s | {tokens_per_s:9.1f} tokens/s",
              flush=True)


if __name__ == "__main__":
    define_flags()
    configs.run(main, gin_flags=False)
