"""Shows what the `roots` mixture reads: per task its documents, tokens, rate and observed share.

  python -m bloom_jax.data.inspect --gin_file=FILE --data_dir=DIR [--num_examples=N] [--json]

The observed share is each task's share of scored tokens in N packed examples drawn from the
same stream the trainer reads (same gin bindings, seed and sequence length).
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app
from absl import flags
import gin
import numpy as np

from bloom_jax.data import pipeline

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Gin files configuring the data.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "ROOTS-style corpus folder (default: the "
                                "corpus shipped with the package, or make_stream.data_dir).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "Packed examples to sample.")
_SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 512, "Tokens per packed example.")
_SEED = flags.DEFINE_integer("seed", 42, "Seed of the stream.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_SAMPLE_CHARS = 160


def summarize(stream: pipeline.PackedStream, num_examples: int) -> dict[str, dict]:
  """Per task: rate, observed share of scored tokens in `num_examples` rows, documents, tokens."""
  batch, task_of_row = stream.next_with_tasks()  # the stream's batch is num_examples rows
  scored = batch["loss_weights"].sum(axis=1)  # [num_examples]
  per_task = np.bincount(task_of_row, weights=scored, minlength=len(stream.tasks))
  del num_examples
  return {task.name: {"rate": stream.rates[task.name],
                      "observed": float(per_task[i] / scored.sum()),
                      "documents": task.num_documents, "tokens": task.num_tokens}
          for i, task in enumerate(stream.tasks)}


def _sample(stream: pipeline.PackedStream, task: pipeline.TokenizedTask) -> str:
  text = stream.vocabulary.decode(task.tokens[task.starts[0]:task.starts[1]].tolist())
  return " ".join(text.split())[:_SAMPLE_CHARS]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gin.parse_config_files_and_bindings(_GIN_FILE.value, _GIN_BINDINGS.value)
  overrides = {"data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
  stream = pipeline.make_stream(sequence_length=_SEQUENCE_LENGTH.value,
                                batch_size=_NUM_EXAMPLES.value, seed=_SEED.value,
                                process_index=0, process_count=1, **overrides)
  summary = summarize(stream, _NUM_EXAMPLES.value)
  if _JSON.value:
    print(json.dumps(summary))
    return
  print(f"{'task':<24}{'documents':>10}{'tokens':>12}{'rate':>9}{'observed':>10}  sample")
  for task in stream.tasks:
    row = summary[task.name]
    print(f"{task.name:<24}{row['documents']:>10}{row['tokens']:>12}{row['rate']:>9.4f}"
          f"{row['observed']:>10.4f}  {_sample(stream, task)}")


if __name__ == "__main__":
  app.run(main)
