"""Tokenizes a corpus once into a token store that train, evaluate and data.inspect read.

  python -m bloom_jax.data.prepare [--gin_file=FILE] --gin.DATA_DIR=RAW --gin.TOKENS_DIR=OUT \\
      [--gin.VOCABULARY=tokenizer.json] [--workers=N] [--engine=local|ray] [--shard_mb=128]

The languages, vocabulary and validation split are the config's (gin_configs/base.gin's without
--gin_file). By default every core of this machine works; `--engine=ray` runs the shards as Ray
Data tasks on the cluster of RAY_ADDRESS (launch/slurm/prepare.sbatch starts one on a SLURM
allocation). A prepare stopped at any point finishes when run again, redoing only missing
shards; the store is the same bytes whatever the engine and the number of workers.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from bloom_jax import configs
from bloom_jax.data import builder
from bloom_jax.data import documents
from bloom_jax.data import pipeline
from bloom_jax.data import store
from bloom_jax.data import tasks

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    configs.define_data_dir_flag()
    flags.DEFINE_integer("workers", None, "Tokenizing processes (default: one per core; with "
                         "--engine=ray, the most Ray tasks at once).")
    flags.DEFINE_enum("engine", "local", builder.ENGINES, "local: processes on this machine; "
                      "ray: Ray Data on the cluster at RAY_ADDRESS (pip install "
                      "'bloom_jax[distributed]').")
    flags.DEFINE_float("shard_mb", builder.DEFAULT_SHARD_BYTES / 2**20,
                       "Input megabytes per shard.")


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    # The data settings of a training config; the rest of it is not loaded here.
    configs.parse_flags(skip_unknown=True, default_file=configs.BASE_CONFIG)
    tokens_dir = configs.macro("TOKENS_DIR")
    if not tokens_dir:
        raise app.UsageError("--gin.TOKENS_DIR=OUT is required: the folder the token store is "
                             "written to.")
    vocabulary = pipeline.as_vocabulary(configs.macro("VOCABULARY"))
    found = tasks.roots_tasks(data_dir=configs.macro("DATA_DIR"), vocabulary=vocabulary)
    manifest = builder.build(tokens_dir, found, vocabulary, workers=FLAGS.workers,
                             engine=FLAGS.engine, shard_bytes=int(FLAGS.shard_mb * 2**20))
    for name, task in manifest["tasks"].items():
        counts = {split: sum(s[split]["tokens"] for s in task["shards"])
                  for split in store.SPLITS}
        skipped = documents.Skipped(store.bad_records(manifest, name))
        print(f"{name}: {len(task['shards'])} shards, {counts['train']:,} train and "
              f"{counts['validation']:,} validation tokens; skipped: {skipped.summary()}")
    print(f"Wrote {tokens_dir}/{store.MANIFEST}.")


if __name__ == "__main__":
    define_flags()
    configs.run(main)
