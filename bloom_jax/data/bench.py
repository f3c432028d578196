"""Measures the data pipeline: one-time tokenization and packed tokens per second.

  python -m bloom_jax.data.bench [--gin_file=FILE] [--data_dir=DIR] [--batch_size=64]

Rows are as long as the config's SEQUENCE_LENGTH (gin_configs/base.gin's without --gin_file).
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import flags

from bloom_jax import configs
from bloom_jax.data import pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    configs.define_data_dir_flag()
    flags.DEFINE_integer("batch_size", 64, "Rows per batch (one process).")
    flags.DEFINE_integer("num_batches", 50, "Batches to time.")


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    # The data settings of a training config; the rest of it is not loaded here.
    configs.parse_flags(skip_unknown=True, default_file=configs.BASE_CONFIG)
    start = time.perf_counter()
    stream = pipeline.make_stream(batch_size=FLAGS.batch_size, process_index=0, process_count=1)
    built = time.perf_counter() - start
    corpus_tokens = sum(task.num_tokens for task in stream.tasks)
    print(f"tokenized {corpus_tokens:,} tokens of {len(stream.tasks)} tasks in {built:.1f} s "
          f"({corpus_tokens / built:,.0f} tokens/s, once per run)")
    next(stream)  # warm the epoch orders
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        next(stream)
    elapsed = time.perf_counter() - start
    packed = FLAGS.num_batches * FLAGS.batch_size * stream.sequence_length
    print(f"packed {packed:,} tokens in {elapsed:.2f} s: {packed / elapsed:,.0f} tokens/s "
          f"(batch {FLAGS.batch_size} x {stream.sequence_length})")


if __name__ == "__main__":
    define_flags()
    configs.run(main)
