"""`python -m bloom_jax.train --gin_file=gin_configs/<size>.gin [--gin.NAME=VALUE ...]`.

Trains BLOOM as the gin files say (the loop is `bloom_jax.trainer.train`), e.g. a smoke run:

    python -m bloom_jax.train --gin_file=gin_configs/tiny.gin --gin.MODEL_DIR=/tmp/bloom_tiny

Every config accepts the macros MODEL_DIR, DATA_DIR, TRAIN_STEPS, BATCH_SIZE, SEQUENCE_LENGTH,
SEED and INIT_FROM (a converted checkpoint to start from); `--gin.NAME=VALUE` binds any of them,
or any parameter (`--gin.train.log_every=1`).
MODEL_DIR receives the checkpoints, TensorBoard events and the full gin config; running the same
command again resumes from its last checkpoint. Bad input (a misspelled binding, a missing
DATA_DIR, another model's checkpoint) ends with one line `error: ...` and exit status 1.
"""

from collections.abc import Sequence

from absl import app

from bloom_jax import configs, trainer


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    configs.parse_flags()
    trainer.train()


if __name__ == "__main__":
    configs.run(main, reported=(*configs.REPORTED_ERRORS, trainer.TrainingError))
