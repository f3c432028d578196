"""Shows what the `roots` mixture reads: per task its documents, tokens, rate, observed share and
the input records skipped as bad when it was tokenized (malformed JSON lines, ...).

  python -m bloom_jax.data.inspect [--gin_file=FILE] [--data_dir=DIR | --gin.TOKENS_DIR=STORE]
      [--num_examples=N] [--json]

The observed share is each task's share of scored tokens in N packed examples drawn from the
same stream the trainer reads: the config's data settings, seed and sequence length (without
--gin_file, those of gin_configs/base.gin; e.g. --gin.SEQUENCE_LENGTH=512 --gin.SEED=1).
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import flags
import numpy as np

from bloom_jax import configs
from bloom_jax.data import pipeline

FLAGS = flags.FLAGS
_SAMPLE_CHARS = 160  # characters of each task's first document shown


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    configs.define_data_dir_flag()
    flags.DEFINE_integer("num_examples", 1000, "Packed examples to sample.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def summarize(stream: pipeline.PackedStream) -> dict[str, dict]:
    """Per task: rate, share of scored tokens in the stream's next batch, documents, tokens, and
    the bad input records skipped, by reason."""
    batch, task_of_row = stream.next_with_tasks()
    scored = batch["loss_weights"].sum(axis=1)  # [batch]
    per_task = np.bincount(task_of_row, weights=scored, minlength=len(stream.tasks))
    return {task.name: {"rate": stream.rates[task.name],
                        "observed": float(per_task[i] / scored.sum()),
                        "documents": task.num_documents, "tokens": task.num_tokens,
                        "bad_records": dict(task.skipped)}
            for i, task in enumerate(stream.tasks)}


def _sample(stream: pipeline.PackedStream, task: pipeline.TokenizedTask) -> str:
    text = stream.vocabulary.decode(task.tokens[task.starts[0]:task.starts[1]].tolist())
    return " ".join(text.split())[:_SAMPLE_CHARS]


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    # The data settings of a training config; the rest of it is not loaded here.
    configs.parse_flags(skip_unknown=True, default_file=configs.BASE_CONFIG)
    stream = pipeline.make_stream(batch_size=FLAGS.num_examples, process_index=0,
                                  process_count=1)
    summary = summarize(stream)  # the stream's batch is num_examples rows
    if FLAGS.json:
        print(json.dumps(summary))
        return
    print(f"{'task':<24}{'documents':>10}{'tokens':>12}{'rate':>9}{'observed':>10}{'bad':>6}"
          "  sample")
    for task in stream.tasks:
        row = summary[task.name]
        print(f"{task.name:<24}{row['documents']:>10}{row['tokens']:>12}{row['rate']:>9.4f}"
              f"{row['observed']:>10.4f}{sum(row['bad_records'].values()):>6}  "
              f"{_sample(stream, task)}")


if __name__ == "__main__":
    define_flags()
    configs.run(main)
