"""The trainer's checkpointer on a tiny model: what it keeps, what it restores, how a failed
background save is reported, and its refusal of another model size."""

import dataclasses
import functools

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
    options = checkpoints.CheckpointOptions(every_steps=1, keep=2, keep_every=4)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, options)
    for step in range(1, 10):
        assert checkpointer.save(at_step(step), DATA_STATE)
    checkpointer.close()
    assert step_dirs(tmp_path) == {"4", "8", "9"}  # 8 and 9 the last two; 4 and 8 multiples of 4


def test_saves_the_first_step_then_every_every_steps_unless_forced(tmp_path):
    options = checkpoints.CheckpointOptions(every_steps=3, keep=10)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG, options)
    saved = [step for step in range(1, 8) if checkpointer.save(at_step(step), DATA_STATE)]
    assert checkpointer.save(at_step(8), DATA_STATE, force=True)
    checkpointer.close()
    assert saved == [1, 3, 6]  # orbax always takes a directory's first save
    assert step_dirs(tmp_path) == {"1", "3", "6", "8"}


def test_restore_returns_the_saved_state_and_data_position(tmp_path):
    state = at_step(7)
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    assert checkpointer.restore(state) is None  # nothing saved yet
    checkpointer.save(state, DATA_STATE, force=True)
    checkpointer.close()

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    reopened = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    assert reopened.latest_step() == 7
    restored, data_state = reopened.restore(abstract)
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


def test_a_failed_background_save_raises_at_the_next_save(tmp_path, failing_writes):
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
    assert checkpointer.save(at_step(1), DATA_STATE, force=True)  # started; fails in background
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.save(at_step(2), DATA_STATE, force=True)
    assert checkpointer.latest_step() is None  # the failed step was never committed


def test_a_failed_background_save_raises_at_close(tmp_path, failing_writes):
    checkpointer = checkpoints.TrainCheckpointer(tmp_path, CONFIG)
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
