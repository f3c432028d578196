"""Measures the data pipeline: one-time tokenization and packed tokens per second.

  python -m bloom_jax.data.bench [--data_dir DIR] [--sequence_length 2048] [--batch_size 64]
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import app
from absl import flags
import gin

from bloom_jax.data import pipeline

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Gin files configuring the data.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "ROOTS-style corpus folder (default: the "
                                "corpus shipped with the package).")
_SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 2048, "Tokens per packed row.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Rows per batch (one process).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Batches to time.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gin.parse_config_files_and_bindings(_GIN_FILE.value, _GIN_BINDINGS.value)
  overrides = {"data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
  start = time.perf_counter()
  stream = pipeline.make_stream(sequence_length=_SEQUENCE_LENGTH.value,
                                batch_size=_BATCH_SIZE.value, process_index=0, process_count=1,
                                **overrides)
  built = time.perf_counter() - start
  corpus_tokens = sum(task.num_tokens for task in stream.tasks)
  print(f"tokenized {corpus_tokens:,} tokens of {len(stream.tasks)} tasks in {built:.1f} s "
        f"({corpus_tokens / built:,.0f} tokens/s, once per run)")
  next(stream)  # warm the epoch orders
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    next(stream)
  elapsed = time.perf_counter() - start
  packed = _NUM_BATCHES.value * _BATCH_SIZE.value * _SEQUENCE_LENGTH.value
  print(f"packed {packed:,} tokens in {elapsed:.2f} s: {packed / elapsed:,.0f} tokens/s "
        f"(batch {_BATCH_SIZE.value} x {_SEQUENCE_LENGTH.value})")


if __name__ == "__main__":
  app.run(main)
