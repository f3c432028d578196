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

import re
import sys
from collections.abc import Sequence

from absl import app, flags

from bloom_jax import configs, trainer

# Errors that describe bad input (a binding, a path, a mesh, a checkpoint) or a run that cannot go
# on: reported as one line. gin's own errors are ValueErrors and SyntaxErrors.
_REPORTED_ERRORS = (ValueError, SyntaxError, FileNotFoundError, trainer.TrainingError)
# What gin appends to an error raised under it: "\n  In call to configurable 'train' (...)".
_GIN_CONTEXT = re.compile(r"\n  In (?:call to configurable|file|bindings string) ")


def _message(error: Exception) -> str:
    """The error's own message, without the trail of configurables gin appends to it."""
    return _GIN_CONTEXT.split(str(error), maxsplit=1)[0]


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        configs.parse_flags()
        trainer.train()
    except _REPORTED_ERRORS as error:
        if flags.FLAGS.verbose:
            raise
        sys.exit(f"error: {_message(error)} (--verbose shows the traceback)")


if __name__ == "__main__":
    flags.DEFINE_bool("verbose", False, "On bad input, show the traceback, not just the error.")
    configs.run(main)
