"""The trainer's checkpoints: the whole train state and the data position, saved asynchronously.

A run's checkpoint directory (MODEL_DIR/checkpoints) is a parameter store directory
(`bloom_jax.param_store`: config.json, item "params" per step) whose steps also hold the
optimizer state, the counters and the input pipeline's position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from absl import logging

from bloom_jax import param_store
from bloom_jax.model import BloomConfig
from bloom_jax.param_store import PARAMS

OPT_STATE = "opt_state"
TRAIN_STATE = "train_state"
DATA = "data"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """When the trainer saves and what it keeps.

    every_steps: save every N steps (and always a new directory's first save, the end and a
      preemption).
    keep: the last K checkpoints are kept; keep_every: every M-th step is also kept forever.
    async_save: write in the background while training goes on (a failure raises at the next
      save or at close).
    """

    every_steps: int = 1000
    keep: int = 3
    keep_every: int | None = None
    async_save: bool = True


class TrainCheckpointer:
    """Saves and restores `TrainState` + data position under a run's checkpoint directory.

    Each step directory holds the items "params", "opt_state", "train_state" (step, counters,
    RNG) and "data" (the input pipeline's JSON state). Every process writes only its own shards;
    orbax commits a step by renaming its temporary directory, so a crash mid-save never leaves a
    half-written checkpoint as the latest one. Restoring onto other shardings (another mesh or
    device count) reshards.
    """

    def __init__(self, directory: str | Path, config: BloomConfig,
                 options: CheckpointOptions | None = None):
        options = options or CheckpointOptions()
        self.directory = Path(directory).absolute()
        if (self.directory / param_store.CONFIG_FILE).is_file():
            param_store.checkpoint_config(self.directory, config, fix="train with the gin config "
                                          "it was saved with, or choose another MODEL_DIR")
        elif jax.process_index() == 0:
            param_store.save_config(self.directory, config)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=(PARAMS, OPT_STATE, TRAIN_STATE, DATA),
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=options.every_steps,
                max_to_keep=options.keep,
                keep_period=options.keep_every,
                enable_async_checkpointing=options.async_save,
            ),
        )

    def should_save(self, step: int) -> bool:
        """Whether `save` would save at `step` without `force` (asks nothing of the devices)."""
        return self._manager.should_save(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves at `state.step` when due (or `force`); returns whether a save was started."""
        step = int(state.step)
        counters = {name: getattr(state, name) for name in _COUNTERS}
        saved = self._manager.save(step, force=force, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            TRAIN_STATE: ocp.args.StandardSave(counters),
            DATA: ocp.args.JsonSave(data_state),
        }))
        if saved:
            logging.info("Saving checkpoint of step %d to %s.", step, self.directory)
        return saved

    def restore(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The latest (state, data_state), placed as `abstract_state`'s shardings say; None if
        there is no checkpoint yet."""
        step = self.latest_step()
        if step is None:
            return None
        counters = {name: getattr(abstract_state, name) for name in _COUNTERS}
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(abstract_state.params),
            OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
            TRAIN_STATE: ocp.args.StandardRestore(counters),
            DATA: ocp.args.JsonRestore(),
        }))
        state = abstract_state.replace(params=restored[PARAMS], opt_state=restored[OPT_STATE],
                                       **restored[TRAIN_STATE])
        return state, restored[DATA]

    def close(self) -> None:
        """Waits for a background save to finish; raises its error if it failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
        self._manager.close()


_COUNTERS = ("step", "consumed_samples", "skipped_steps", "loss_ema", "rng")
