"""`python -m bloom_jax.evaluate`: validation loss, perplexity and bits per byte of a checkpoint.

    python -m bloom_jax.evaluate --ckpt_dir=/tmp/bloom_tiny --gin_file=gin_configs/tiny.gin \\
        [--data_dir=DIR] [--batch_size=N] [--json]

`--ckpt_dir` is a checkpoint directory (e.g. from `bloom_jax.convert from_hf`) or a training
run's MODEL_DIR; its latest step is evaluated on each language's validation split, with the
model, mesh, sequence length and vocabulary of the gin config (`bloom_jax.evaluation`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
from absl import flags

from bloom_jax import configs, evaluation

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's own flags (configs.run adds the gin flags, --data_dir and --verbose)."""
    flags.DEFINE_string("ckpt_dir", None, "A checkpoint directory (its root holds config.json), "
                        "e.g. from `bloom_jax.convert from_hf`, or a training run's MODEL_DIR; "
                        "the latest step's parameters are evaluated.", required=True)
    flags.DEFINE_integer("batch_size", None, "Global sequences per eval forward pass (default: "
                         "one per data-parallel device, data x fsdp). Results do not depend on it.")
    flags.DEFINE_bool("json", False, "Print one JSON object {task: {loss, perplexity, "
                      "bits_per_byte, tokens, bytes}} instead of a table.")


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    configs.parse_flags(skip_unknown=configs.LOOP_CONFIGURABLES)
    results = evaluation.evaluate_checkpoint(FLAGS.ckpt_dir, FLAGS.batch_size)
    if jax.process_index() == 0:
        print(json.dumps(results) if FLAGS.json else evaluation.format_table(results))


if __name__ == "__main__":
    define_flags()
    configs.run(main)
