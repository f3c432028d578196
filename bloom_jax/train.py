"""`python -m bloom_jax.train --gin_file=gin_configs/<size>.gin [--gin.NAME=VALUE ...]`.

Trains BLOOM as the gin files say (the loop is `bloom_jax.trainer.train`), e.g. a smoke run:

    python -m bloom_jax.train --gin_file=gin_configs/tiny.gin --gin.MODEL_DIR=/tmp/bloom_tiny

Every config accepts the macros MODEL_DIR, DATA_DIR, TOKENS_DIR (a token store from
`bloom_jax.data.prepare`), TRAIN_STEPS, BATCH_SIZE, SEQUENCE_LENGTH, MICRO_BATCH_SIZE, SEED,
VOCABULARY, INIT_FROM (a converted checkpoint to start from) and DOCUMENT_MASKING (False:
BLOOM's packing, plain causal attention across a row's documents);
`--gin.NAME=VALUE` binds any of them, or any parameter (`--gin.train.log_every=1`).
MODEL_DIR receives the checkpoints, TensorBoard events and the full gin config; running the same
command again resumes from its last checkpoint. Bad input (a misspelled binding, a missing
DATA_DIR, another model's checkpoint) ends with one line `error: ...` and exit status 1.
"""

from collections.abc import Sequence

from bloom_jax import checkpoints, configs, distributed, trainer


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    configs.parse_flags()  # strict: the trainer registers every configurable a config binds
    trainer.train()


if __name__ == "__main__":
    configs.run(main, reported=(*configs.REPORTED_ERRORS, trainer.TrainingError,
                                distributed.PeerFailed),
                abandoning_threads=(checkpoints.SaveFailed, distributed.PeerFailed))
