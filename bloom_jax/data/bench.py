"""Measures the data pipeline: one-time tokenization and packed tokens per second.

  python -m bloom_jax.data.bench [--data_dir DIR] [--sequence_length 2048] [--batch_size 64]
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import app
from absl import flags

from bloom_jax import configs
from bloom_jax.data import pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    flags.DEFINE_string("data_dir", None, "ROOTS-style corpus folder (default: the "
                                          "corpus shipped with the package).")
    flags.DEFINE_integer("sequence_length", 2048, "Tokens per packed row.")
    flags.DEFINE_integer("batch_size", 64, "Rows per batch (one process).")
    flags.DEFINE_integer("num_batches", 50, "Batches to time.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configs.parse(FLAGS.gin_file, FLAGS.gin_bindings)
    overrides = {"data_dir": FLAGS.data_dir} if FLAGS.data_dir else {}
    start = time.perf_counter()
    stream = pipeline.make_stream(sequence_length=FLAGS.sequence_length,
                                  batch_size=FLAGS.batch_size, process_index=0, process_count=1,
                                  **overrides)
    built = time.perf_counter() - start
    corpus_tokens = sum(task.num_tokens for task in stream.tasks)
    print(f"tokenized {corpus_tokens:,} tokens of {len(stream.tasks)} tasks in {built:.1f} s "
          f"({corpus_tokens / built:,.0f} tokens/s, once per run)")
    next(stream)  # warm the epoch orders
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        next(stream)
    elapsed = time.perf_counter() - start
    packed = FLAGS.num_batches * FLAGS.batch_size * FLAGS.sequence_length
    print(f"packed {packed:,} tokens in {elapsed:.2f} s: {packed / elapsed:,.0f} tokens/s "
          f"(batch {FLAGS.batch_size} x {FLAGS.sequence_length})")


if __name__ == "__main__":
    define_flags()
    configs.run(main)
