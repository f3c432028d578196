"""The trainer's checkpointer on a tiny model: what it keeps, what it restores, how a failed
background save is reported, its refusal of damaged steps, of a second trainer and of another
model size."""

import dataclasses
import functools
import os
import re
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bloom_jax import checkpoints, optim, param_store, step as step_lib
from bloom_jax.model import BloomConfig, BloomForCausalLM

CONFIG = BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)
DATA_STATE = {"version": 1, "seed": 42, "sequence_length": 32, "step": 7,
              "rows_drawn": {"roots_en": 11, "roots_fr": 3}}


@functools.lru_cache
def train_state() -> step_lib.TrainState:
    """A state whose every leaf is random, counters included, so that a mix-up shows."""
    variables = BloomForCausalLM(CONFIG).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    state = step_lib.create_train_state(nn.unbox(variables["params"]), optim.make_optimizer(),
                                        seed=0)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(treedef, [
        jnp.asarray(rng.integers(1, 1000, x.shape) if jnp.issubdtype(x.dtype, jnp.integer)
                    else rng.normal(size=x.shape), x.dtype) for x in leaves])


def at_step(step: int) -> step_lib.TrainState:
    return train_state().replace(step=jnp.int32(step))


def step_dirs(directory) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_dir()}


def test_keeps_the_last_checkpoints_and_every_keep_every_th(tmp_path):
    options = checkpoints.CheckpointOptions(every_steps=1, keep=2, keep_every=3)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, options)
    for step in range(1, 8):
        assert checkpointer.save(at_step(step), DATA_STATE)
    checkpointer.close()
    assert step_dirs(tmp_path) == {"3", "6", "7"}  # 6 and 7 the last two; 3 and 6 multiples of 3


def test_saves_the_first_step_then_every_every_steps_unless_forced(tmp_path):
    options = checkpoints.CheckpointOptions(every_steps=3, keep=10)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, options)
    saved = [step for step in range(1, 8) if checkpointer.save(at_step(step), DATA_STATE)]
    assert checkpointer.save(at_step(8), DATA_STATE, force=True)
    checkpointer.close()
    assert saved == [1, 3, 6]  # orbax always takes a directory's first save
    assert step_dirs(tmp_path) == {"1", "3", "6", "8"}


def test_every_steps_none_saves_only_when_forced(tmp_path):
    checkpointer = checkpoints.TrainCheckpointer(
        tmp_path, CONFIG, checkpoints.CheckpointOptions(every_steps=None))
    saved = [step for step in range(1, 8) if checkpointer.save(at_step(step), DATA_STATE)]
    assert checkpointer.save(at_step(8), DATA_STATE, force=True)  # the end, or a preemption
    checkpointer.close()
    assert saved == []
    assert step_dirs(tmp_path) == {"8"}


def test_restore_returns_the_saved_state_and_data_position(tmp_path):
    state = at_step(7)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    assert checkpointer.restore(state) is None  # nothing saved yet
    checkpointer.save(state, DATA_STATE, force=True)
    checkpointer.close()

    reopened = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    assert reopened.latest_step() == 7
    restored, data_state = reopened.restore(abstract(state))
    reopened.close()
    assert data_state == DATA_STATE
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert [x.dtype for x in jax.tree.leaves(restored)] == [x.dtype for x in jax.tree.leaves(state)]
    for field in dataclasses.fields(state):
        jax.tree.map(np.testing.assert_array_equal,
                     jax.device_get(getattr(restored, field.name)),
                     jax.device_get(getattr(state, field.name)))


@pytest.fixture
def failing_writes(monkeypatch):
    """Every background write of the "data" item fails as a full disk would. (Root ignores file
    modes, so the failure is simulated in orbax's JSON writer, which runs in the background.)"""
    async def disk_full(self, item, directory):
        raise OSError("No space left on device")
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full)


ASYNC = checkpoints.CheckpointOptions(async_save=True)


def test_a_failed_save_raises_at_its_own_step(tmp_path, failing_writes):
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG)  # synchronous by default
    with pytest.raises(checkpoints.SaveFailed, match="checkpoint of step 1 .* No space left"):
        checkpointer.save(at_step(1), DATA_STATE, force=True)
    checkpointer.close()  # returns at once after a failure
    assert checkpointer.latest_step() is None


def test_a_failed_background_save_raises_at_the_next_check_without_another_save(
        tmp_path, failing_writes):
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, ASYNC)
    assert checkpointer.save(at_step(1), DATA_STATE, force=True)  # started; fails in background
    deadline = time.monotonic() + 60  # a hang guard: the write fails at once
    with pytest.raises(checkpoints.SaveFailed, match="checkpoint of step 1 .* No space left"):
        while time.monotonic() < deadline:
            checkpointer.check()  # what the loop calls after every step
            time.sleep(0.01)
    assert "1" not in step_dirs(tmp_path)  # the failed step was never committed


def test_a_failed_background_save_raises_at_the_next_save(tmp_path, failing_writes):
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, ASYNC)
    assert checkpointer.save(at_step(1), DATA_STATE, force=True)  # started; fails in background
    with pytest.raises(checkpoints.SaveFailed, match="checkpoint of step 1 .* No space left"):
        checkpointer.save(at_step(2), DATA_STATE, force=True)
    assert checkpointer.latest_step() is None  # the failed step was never committed


def test_a_failed_background_save_raises_at_close(tmp_path, failing_writes):
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, ASYNC)
    assert checkpointer.save(at_step(1), DATA_STATE, force=True)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.close()
    assert step_dirs(tmp_path) <= {"1.orbax-checkpoint-tmp"}  # no committed step directory


def test_refuses_a_directory_saved_for_another_model_size(tmp_path):
    checkpoints.TrainCheckpointer(tmp_path, CONFIG).close()
    bigger = dataclasses.replace(CONFIG, hidden_size=32, n_head=4)
    with pytest.raises(ValueError, match=r"saved for another model \(hidden_size: checkpoint 16 "
                                         r"vs asked 32, n_head: checkpoint 2 vs asked 4\); train "
                                         r"with the gin config it was saved with"):
        checkpoints.TrainCheckpointer(tmp_path, bigger)
    assert param_store.load_config(tmp_path) == CONFIG  # left as it was


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def saved_steps(directory, steps, keep=10):
    """A checkpoint directory holding `steps`, each a state that differs from the others."""
    checkpointer = checkpoints.TrainCheckpointer(
        directory, CONFIG, checkpoints.CheckpointOptions(every_steps=1, keep=keep))
    for step in steps:
        state = at_step(step)
        checkpointer.save(state.replace(params=jax.tree.map(lambda p: p + step, state.params)),
                          {**DATA_STATE, "step": step}, force=True)
    checkpointer.close()


def largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    for k in range(count):
        data[len(data) // 3 + k] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def corrupt_json(path):
    path.write_text('{"step": 9, "rows_dr')


def assert_restores_step(directory, step: int) -> None:
    """A new checkpointer on `directory` restores the state and data position saved at `step`."""
    checkpointer = checkpoints.TrainCheckpointer(directory, CONFIG)
    restored, data_state = checkpointer.restore(abstract(at_step(0)))
    checkpointer.close()
    assert int(restored.step) == step and data_state["step"] == step
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.tree.map(lambda p: np.asarray(p) + step, at_step(step).params))


@pytest.mark.parametrize("damage, item, refusal", [
    (flip_bytes, "params", r"(fails verification: \['params'\]|cannot be read)"),
    (truncate, "params", "cannot be read"),
    (flip_bytes, "opt_state", r"(fails verification: \['opt_state'\]|cannot be read)"),
    (corrupt_json, "data/metadata", "cannot be read"),
])
def test_a_damaged_step_is_refused_by_name_and_the_previous_one_restored(
        tmp_path, caplog, damage, item, refusal):
    saved_steps(tmp_path, [3, 6])
    target = tmp_path / "6" / item
    damage(largest_file(target) if target.is_dir() else target)
    assert_restores_step(tmp_path, 3)
    (error,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error: ")]
    assert re.search(rf"checkpoint step 6 in {tmp_path} {refusal}", error), error
    assert "Falling back to step 3, the newest checkpoint that verifies" in caplog.text
    assert step_dirs(tmp_path) == {"3", "6.corrupt"}  # set aside, not deleted


def test_a_step_saved_without_digests_is_restored_unverified(tmp_path, caplog):
    saved_steps(tmp_path, [3, 6])
    shutil.rmtree(tmp_path / "6" / checkpoints.DIGESTS)  # as an older bloom_jax saved it
    assert_restores_step(tmp_path, 6)
    assert f"Checkpoint step 6 in {tmp_path} holds no digests" in caplog.text
    assert "restored unverified" in caplog.text
    assert step_dirs(tmp_path) == {"3", "6"}  # nothing set aside


def test_no_step_that_verifies_is_an_error_naming_them(tmp_path):
    saved_steps(tmp_path, [3])
    flip_bytes(largest_file(tmp_path / "3" / "params"))
    for refusal in (r"No checkpoint in .* verifies \(refused: \['3.corrupt'\]\)",
                    "3.corrupt"):  # and again once it is set aside: not a fresh start
        checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
        with pytest.raises(checkpoints.CorruptCheckpoint, match=refusal):
            checkpointer.restore(abstract(at_step(0)))
        checkpointer.close()


def test_retention_keeps_the_verified_step_the_run_resumed_from(tmp_path):
    saved_steps(tmp_path, [3])
    options = checkpoints.CheckpointOptions(every_steps=1, keep=1)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, options)
    checkpointer.restore(abstract(at_step(0)))
    for step in (4, 5, 6):
        checkpointer.save(at_step(step), DATA_STATE)
    checkpointer.close()
    assert step_dirs(tmp_path) == {"3", "6"}


def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path):
    first = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    first.claim()
    with pytest.raises(OSError, match=rf"{tmp_path} is in use by another trainer \(pid "
                                      rf"{os.getpid()} on .* holds .*\.lock\)"):
        checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    first.close()
    checkpoints.TrainCheckpointer(tmp_path, CONFIG).close()  # free again once the first closed


def test_a_params_only_checkpoint_serves_the_parameters_and_refuses_to_resume(tmp_path):
    state = at_step(5)
    options = checkpoints.CheckpointOptions(params_only=True)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, options)
    checkpointer.save(state, DATA_STATE, force=True)
    checkpointer.close()
    assert not (tmp_path / "5" / checkpoints.OPT_STATE).exists()

    _, params = param_store.load_params(tmp_path, CONFIG)  # what generate and convert read
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(state.params))
    reopened = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    with pytest.raises(checkpoints.ParamsOnlyCheckpoint, match="parameters only.*INIT_FROM"):
        reopened.restore(abstract(state))
    reopened.close()
