"""The trainer's checkpoints: the whole train state and the data position, saved from where the
arrays live (or in the background) and verified when restored.

A run's checkpoint directory (MODEL_DIR/checkpoints) is a parameter store directory
(`bloom_jax.param_store`: config.json, item "params" per step) whose steps also hold the
optimizer state, the counters, the input pipeline's position and the digests of all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from bloom_jax import param_store
from bloom_jax.model import BloomConfig
from bloom_jax.param_store import PARAMS

OPT_STATE = "opt_state"
TRAIN_STATE = "train_state"
DATA = "data"
DIGESTS = "digests"
LOCK_FILE = ".lock"
REFUSED_SUFFIX = ".corrupt"  # a refused step's directory, renamed aside: orbax ignores it


class CorruptCheckpoint(ValueError):
    """A checkpoint step whose contents are unreadable or differ from what was saved."""


class SaveFailed(OSError):
    """A checkpoint could not be written (disk full, permissions, ...)."""


class ParamsOnlyCheckpoint(ValueError):
    """The newest checkpoint holds no optimizer state (`CheckpointOptions.params_only`)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """When the trainer saves and what it keeps.

    every_steps: save every N steps (and always a new directory's first save, the end and a
      preemption); None: at the end and at a preemption only.
    keep: the last K checkpoints are kept; keep_every: every M-th step is also kept forever;
      the step a run resumed from (verified) is kept while the run lasts.
    async_save: write in the background while training goes on. orbax then holds a host copy
      of the whole state until it is written (on CPU devices the old state itself, which the
      next step cannot reuse): the state's bytes again in host memory. Off (the default), the
      step waits while the arrays are written (on CPUs from their own buffers; orbax copies
      GPU arrays to the host first), and a failed save raises at its own step; on, a failure
      raises at the next step's `check`.
    params_only: save the parameters without the optimizer state (a third of the bytes: 2.2
      instead of 6.7 GB at 560M), for smoke runs whose result is only generated from or
      converted. `generate`, `convert`, `evaluate` and INIT_FROM read such a checkpoint; a run
      cannot resume from it (Adam's moments are gone) and says so.
    """

    every_steps: int | None = 1000
    keep: int = 3
    keep_every: int | None = None
    async_save: bool = False
    params_only: bool = False


def _checksum(x: jax.Array) -> jax.Array:
    """[2] uint32: the sum of `x`'s bit patterns and their sum weighted by odd position numbers.

    Any one flipped bit, and any swap of two different elements, changes it. Integer sums
    wrap, so the result does not depend on the sharding or the reduction order. Both sums are
    one variadic reduction, which XLA fuses with the bit casts and positions: no temporary of
    `x`'s size (two separate sums materialized the bits and positions, twice the state's bytes).
    """
    width = jnp.dtype(x.dtype).itemsize * 8
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
    position = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * stride
        stride *= x.shape[axis]
    zero = jnp.uint32(0)
    sums = jax.lax.reduce((bits, bits * (2 * position + 1)), (zero, zero),
                          lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))
    return jnp.stack(sums)


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def digests(items: dict[str, Any], data_state: dict) -> dict[str, str]:
    """{"<item><path>": hex digest} of every array of `items` and of the data position."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_checksums(items)))[0]
    found = {jax.tree_util.keystr(path): np.asarray(sums).astype(">u4").tobytes().hex()
             for path, sums in flat}
    data = json.dumps(data_state, sort_keys=True).encode()
    return {**found, f"['{DATA}']": hashlib.sha256(data).hexdigest()}


@dataclasses.dataclass
class _KeepStep(policies.PreservationPolicy):
    """Preserves one step (None: none): the verified step a run resumed from."""

    step: int | None = None

    def should_preserve(self, checkpoints, *, context):
        del context
        return [info.step == self.step for info in checkpoints]


def _write_bound_gb(config: BloomConfig) -> int:
    """GB of array data orbax may write at once per item: one word-embedding matrix (the largest
    array) and up to 1 GB more. tensorstore holds what is in flight, which unbounded was about
    the whole state again (5.8 GB at 560M)."""
    largest = config.vocab_size * config.hidden_size * jnp.dtype(config.param_dtype).itemsize
    return largest // 10**9 + 1


def _save_policy(every_steps: int | None) -> policies.SaveDecisionPolicy:
    """Every `every_steps` steps and a directory's first save; None: only forced saves."""
    if every_steps is None:
        return policies.SpecificStepsPolicy(())
    return policies.AnySavePolicy([policies.FixedIntervalPolicy(every_steps),
                                   policies.InitialSavePolicy()])


def _lock(directory: Path) -> Any:
    """Holds `directory`/.lock for the life of the process; refuses a directory a live trainer
    holds. (flock is released by the kernel when its holder exits, killed or not.) The file's
    holder line is written by `TrainCheckpointer.claim`."""
    lock = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise OSError(f"{directory} is in use by another trainer ({holder} holds "
                      f"{directory / LOCK_FILE}); wait for it to finish, or choose another "
                      "MODEL_DIR.") from None
    return lock


class TrainCheckpointer:
    """Saves and restores `TrainState` + data position under a run's checkpoint directory.

    Each step directory holds the items "params", "opt_state", "train_state" (step, counters,
    RNG), "data" (the input pipeline's JSON state) and "digests" (a checksum of every array and
    of the data state, taken from the saved state in memory). A restore recomputes the checksums
    of what orbax read back and refuses a step that differs or cannot be read, naming it; the
    newest step that verifies is restored instead and refused steps are renamed `<step>.corrupt`.
    Every process writes only its own shards; orbax commits a step by renaming its temporary
    directory, so a crash mid-save never leaves a half-written checkpoint as the latest one.
    Restoring onto other shardings (another mesh or device count) reshards. Process 0 holds a
    lock on the directory, so a second trainer on the same MODEL_DIR is refused (`claim` writes
    its pid into the lock file).
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
        self._lock = _lock(self.directory) if jax.process_index() == 0 else None
        self._verified = _KeepStep()
        keep = [policies.LatestN(options.keep), self._verified]
        if options.keep_every:
            keep.append(policies.EveryNSteps(options.keep_every))
        arrays = ocp.StandardCheckpointHandler(save_concurrent_gb=_write_bound_gb(config))
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=(PARAMS, OPT_STATE, TRAIN_STATE, DATA, DIGESTS),
            item_handlers={PARAMS: arrays, OPT_STATE: arrays, TRAIN_STATE: arrays},
            options=ocp.CheckpointManagerOptions(
                save_decision_policy=_save_policy(options.every_steps),
                preservation_policy=policies.AnyPreservationPolicy(keep),
                enable_async_checkpointing=options.async_save,
            ),
        )
        self._saving: int | None = None  # the step of the save last started
        self._failed = False
        self._params_only = options.params_only

    def claim(self) -> None:
        """Writes this process into the lock file, which a refused second trainer names. Call it
        once the run's start-up is validated: a run refused before leaves the directory as it
        was."""
        if self._lock is not None:
            self._lock.truncate(0)
            self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            self._lock.flush()

    def should_save(self, step: int) -> bool:
        """Whether `save` would save at `step` without `force` (asks nothing of the devices)."""
        return self._manager.should_save(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves at `state.step` when due (or `force`); returns whether a save was started.
        Raises `SaveFailed` if this save, or the one before it, failed."""
        step = int(state.step)
        if not (force or self._manager.should_save(step)):
            return False
        items = {PARAMS: state.params, OPT_STATE: state.opt_state,
                 TRAIN_STATE: {name: getattr(state, name) for name in _COUNTERS}}
        if self._params_only:
            del items[OPT_STATE]
        with self._reporting_failures():  # the previous save's failure, named as its own
            self._manager.wait_until_finished()  # (orbax's save waits for it too)
            self._manager.check_for_errors()
        self._saving = step
        with self._reporting_failures():
            saved = self._manager.save(step, force=force, args=ocp.args.Composite(
                **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
                **{DATA: ocp.args.JsonSave(data_state),
                   DIGESTS: ocp.args.JsonSave(digests(items, data_state))}))
            if saved:
                logging.info("Saving checkpoint of step %d to %s.", step, self.directory)
        return saved

    def check(self) -> None:
        """Raises `SaveFailed` if a background save has failed (cheap: call it every step).

        orbax's finalize thread takes the error of a failed write, so the error is read from that
        thread once it is done (joining a finished thread does not wait)."""
        with self._reporting_failures():
            if not self._manager.is_saving_in_progress():
                self._manager.wait_until_finished()
            self._manager.check_for_errors()

    def restore(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest verified (state, data_state), placed as `abstract_state`'s shardings say;
        None if there is no checkpoint yet. Raises `CorruptCheckpoint` if none verifies, and
        `ParamsOnlyCheckpoint` if the newest holds no optimizer state."""
        refused = []
        steps = self._manager.all_steps()
        if steps and not (self.directory / str(steps[-1]) / OPT_STATE).is_dir():
            raise ParamsOnlyCheckpoint(
                f"checkpoint step {steps[-1]} in {self.directory} holds parameters only "
                "(CheckpointOptions.params_only): there is no optimizer state to resume from; "
                f"start a new run from its parameters with --gin.INIT_FROM={self.directory} "
                "and another MODEL_DIR (Adam's moments start afresh), or move the step away to "
                "resume from an earlier checkpoint.")
        for step in reversed(steps):
            try:
                restored = self._restore_verified(step, abstract_state)
            except CorruptCheckpoint as error:
                logging.error("error: %s", error)
                refused.append(step)
                continue
            if refused:
                logging.warning("Falling back to step %d, the newest checkpoint that verifies; "
                                "refused: %s.", step, _set_aside(self.directory, refused))
                self._manager.reload()
            self._verified.step = step
            return restored
        left_aside = sorted(self.directory.glob(f"*{REFUSED_SUFFIX}"))
        if refused or left_aside:
            names = _set_aside(self.directory, refused) if refused else left_aside
            raise CorruptCheckpoint(
                f"No checkpoint in {self.directory} verifies (refused: {names}); restore them "
                "from a backup, or delete them (or choose another MODEL_DIR) to start afresh.")
        return None

    def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        counters = {name: getattr(abstract_state, name) for name in _COUNTERS}
        targets = {PARAMS: abstract_state.params, OPT_STATE: abstract_state.opt_state,
                   TRAIN_STATE: counters}
        # A step saved before checkpoints held digests is restored unverified, not refused.
        json_items = (DATA, DIGESTS) if (self.directory / str(step) / DIGESTS).is_dir() else (
            DATA,)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(tree) for name, tree in targets.items()},
                **{name: ocp.args.JsonRestore() for name in json_items}))
        except Exception as error:  # orbax and tensorstore raise many kinds on damaged files
            raise CorruptCheckpoint(f"checkpoint step {step} in {self.directory} cannot be read "
                                    f"({type(error).__name__}: {error})") from error
        state = abstract_state.replace(params=restored[PARAMS], opt_state=restored[OPT_STATE],
                                       **restored[TRAIN_STATE])
        if DIGESTS not in json_items:
            logging.warning("Checkpoint step %d in %s holds no digests (it was saved by an older "
                            "bloom_jax): restored unverified.", step, self.directory)
            return state, restored[DATA]
        found = digests({name: restored[name] for name in targets}, restored[DATA])
        saved = restored[DIGESTS]
        if not isinstance(saved, dict):
            raise CorruptCheckpoint(f"checkpoint step {step} in {self.directory}: its digests "
                                    "file is damaged")
        wrong = [name for name in found if saved.get(name) != found[name]]
        if wrong:
            raise CorruptCheckpoint(
                f"checkpoint step {step} in {self.directory} fails verification: "
                f"{', '.join(wrong[:5])}{' and more' if len(wrong) > 5 else ''} differ from "
                "what was saved")
        return state, restored[DATA]

    def close(self) -> None:
        """Waits for a background save to finish; raises `SaveFailed` if it failed. After a
        failure it returns at once: orbax's threads of the failed save may never finish."""
        if self._failed:
            return
        with self._reporting_failures():
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        self._manager.close()
        if self._lock is not None:
            self._lock.close()

    @contextlib.contextmanager
    def _reporting_failures(self) -> Iterator[None]:
        """Turns an orbax error into `SaveFailed`, naming the step whose save failed."""
        try:
            yield
        except Exception as error:
            self._failed = True
            raise SaveFailed(f"saving the checkpoint of step {self._saving} to {self.directory} "
                             f"failed ({type(error).__name__}: {error}); free space or fix the "
                             "permissions, then run again to resume from the last checkpoint"
                             ) from error


def _set_aside(directory: Path, steps: list[int]) -> list[str]:
    """Renames refused step directories to `<step>.corrupt` (process 0; all wait for it)."""
    names = [f"{step}{REFUSED_SUFFIX}" for step in steps]
    if jax.process_index() == 0:
        for step, name in zip(steps, names):
            (directory / str(step)).rename(directory / name)
    multihost_utils.sync_global_devices("bloom_jax checkpoints set aside")
    return names


_COUNTERS = ("step", "consumed_samples", "skipped_steps", "loss_ema", "rng")
