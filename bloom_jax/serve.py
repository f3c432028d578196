"""`python -m bloom_jax.serve`: an OpenAI-compatible completions server (FastAPI on uvicorn).

    python -m bloom_jax.serve --ckpt_dir=DIR [--vocabulary=FILE] | --hf_dir=DIR \\
        [--port=8000] [--mesh=1,1,8] [--max_batch=16] [--max_queue=64] [--context=2048]

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Les modèles de langue", "max_tokens": 20, "temperature": 0}'

Requests that arrive together are decoded as one batch (`bloom_jax.serving`); `"stream": true`
sends the text as server-sent events. Greedy answers (temperature 0) are `generate`'s.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import uvicorn
from absl import flags

from bloom_jax import configs, generate, serving

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The server's flags (configs.run adds --verbose)."""
    generate.define_model_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_integer("max_batch", 16, "Requests decoded together at most.")
    flags.DEFINE_integer("max_queue", 64, "Requests waiting at most; more get 503.")
    flags.DEFINE_integer("context", 2048, "Tokens of prompt plus completion a request may ask "
                         "for (BLOOM was trained on 2048).")
    flags.DEFINE_string("model_name", None, "The model's name in the API (default: the "
                        "checkpoint directory's name).")


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    for name in ("max_batch", "max_queue", "context"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be at least 1.")
    run, params, vocabulary = generate.load_flagged_model()
    params = run.put_params(params)  # the layers split once, not sliced at every token
    engine = serving.Engine(run, params, vocabulary, context=FLAGS.context,
                            max_batch=FLAGS.max_batch, max_queue=FLAGS.max_queue)
    name = FLAGS.model_name or pathlib.Path(FLAGS.hf_dir or FLAGS.ckpt_dir).resolve().name
    print(f"Serving {name} on http://{FLAGS.host}:{FLAGS.port}/v1/completions", flush=True)
    uvicorn.run(serving.create_app(engine, name), host=FLAGS.host, port=FLAGS.port,
                log_level="warning")


if __name__ == "__main__":
    define_flags()
    configs.run(main, gin_flags=False)
