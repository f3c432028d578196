"""Train and eval step: gradient accumulation, surplus-row masking, skipping bad updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from bloom_jax import optim, step as step_lib
from bloom_jax.model import BloomConfig, BloomForCausalLM

CONFIG = BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
LENGTH = 8
# Warm up over the first step's 16 tokens so that step 1 already moves every parameter.
OPTIMIZER = optim.make_optimizer(functools.partial(
    optim.learning_rate_schedule, peak_lr=1e-3, min_lr=1e-4, warmup_tokens=16,
    decay_tokens=10_000))


def make_batch(rows, seed=0):
    """A packed batch of `rows` sequences, two documents per row."""
    ids = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (rows, LENGTH + 1))
    segment_ids = np.array([[1] * 5 + [2] * 3] * rows)
    positions = np.array([list(range(5)) + list(range(3))] * rows)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_weights": np.ones((rows, LENGTH), np.float32)}


def micro_batched(batch, micro_batches):
    return {k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}


@functools.lru_cache
def fresh_state():
    model = BloomForCausalLM(CONFIG)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH), jnp.int32)))
    return step_lib.create_train_state(params["params"], OPTIMIZER, seed=0)


@functools.lru_cache
def jitted_step(skip_policy):
    return jax.jit(step_lib.make_train_step(BloomForCausalLM(CONFIG), OPTIMIZER, skip_policy))


def run_step(batch, batch_size=None, state=None, skip_policy=step_lib.SkipPolicy()):
    step = jitted_step(skip_policy)
    rows = batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
    return step(state or fresh_state(), batch, rows if batch_size is None else batch_size)


def assert_trees_close(a, b, **tolerance):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


def test_accumulating_micro_batches_equals_one_big_batch():
    batch = make_batch(4)
    whole, whole_metrics = run_step(micro_batched(batch, 1))
    accumulated, accumulated_metrics = run_step(micro_batched(batch, 2))
    np.testing.assert_allclose(accumulated_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(accumulated_metrics["grad_norm"], whole_metrics["grad_norm"],
                               rtol=1e-5)
    assert_trees_close(accumulated.params, whole.params, rtol=1e-5, atol=1e-7)
    assert int(whole.consumed_samples) == 4 and int(whole.step) == 1


def test_surplus_rows_do_not_count():
    batch = make_batch(4)
    three = {k: v[:3] for k, v in batch.items()}
    exact, exact_metrics = run_step(micro_batched(three, 1))
    padded, padded_metrics = run_step(micro_batched(batch, 2), batch_size=3)
    np.testing.assert_allclose(padded_metrics["loss"], exact_metrics["loss"], rtol=1e-6)
    assert_trees_close(padded.params, exact.params, rtol=1e-5, atol=1e-7)
    assert int(padded.consumed_samples) == 3


def test_a_batch_padded_with_unused_micro_batches_trains_as_the_exact_one():
    """The ramp's smaller batches come padded to the compiled shape: the padding is never read."""
    batch = micro_batched(make_batch(4), 2)
    exact, exact_metrics = run_step(batch, batch_size=3)
    garbage = micro_batched(make_batch(4, seed=1), 2)
    padded_batch = {k: np.concatenate([v, garbage[k]]) for k, v in batch.items()}
    padded, padded_metrics = run_step(padded_batch, batch_size=3)
    jax.tree.map(np.testing.assert_array_equal, padded_metrics, exact_metrics)
    jax.tree.map(np.testing.assert_array_equal, padded, exact)


def test_step_updates_parameters_and_reports_learning_rate():
    state = fresh_state()
    new, metrics = run_step(micro_batched(make_batch(2), 1))
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"])
    # Warmup starts at lr 0: parameters move from the second step on.
    assert metrics["learning_rate"] == 0
    newer, metrics = run_step(micro_batched(make_batch(2, seed=1), 1), state=new)
    assert metrics["learning_rate"] > 0
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), newer.params, state.params)
    assert all(jax.tree_util.tree_leaves(moved))


def test_non_finite_step_is_skipped_and_counted():
    state, _ = run_step(micro_batched(make_batch(2), 1))
    bad = make_batch(2, seed=1)
    bad["loss_weights"][0, 3] = np.nan
    new, metrics = run_step(micro_batched(bad, 1), state=state)
    assert metrics["skipped"] == 1 and not np.isfinite(metrics["loss"])
    assert_trees_close(new.params, state.params, rtol=0, atol=0)
    assert_trees_close(new.opt_state, state.opt_state, rtol=0, atol=0)
    assert int(new.skipped_steps) == 1 and int(new.step) == 2


def test_spike_rule_skips_a_loss_far_above_its_average():
    state, metrics = run_step(micro_batched(make_batch(2), 1))
    state = state.replace(loss_ema=jnp.float32(metrics["loss"] / 10))
    policy = step_lib.SkipPolicy(spike_factor=3.0)
    new, metrics = run_step(micro_batched(make_batch(2, seed=1), 1), state=state,
                            skip_policy=policy)
    assert metrics["skipped"] == 1
    assert_trees_close(new.params, state.params, rtol=0, atol=0)
    calm, metrics = run_step(micro_batched(make_batch(2, seed=1), 1), state=state)
    assert metrics["skipped"] == 0


def test_eval_step_is_the_training_loss():
    batch = make_batch(3)
    state = fresh_state()
    _, metrics = run_step(micro_batched(batch, 1))
    loss_sum, weights = step_lib.eval_step(BloomForCausalLM(CONFIG), state.params, batch)
    np.testing.assert_allclose(loss_sum / weights, metrics["loss"], rtol=1e-6)
    assert weights == 3 * LENGTH


def test_an_update_that_makes_a_parameter_non_finite_is_skipped():
    infinite_lr = optim.make_optimizer(lambda tokens: jnp.float32(np.inf))
    step = jax.jit(step_lib.make_train_step(BloomForCausalLM(CONFIG), infinite_lr))
    state = fresh_state().replace(opt_state=infinite_lr.init(fresh_state().params))
    new, metrics = step(state, micro_batched(make_batch(2), 1), 2)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])  # the case
    assert metrics["skipped"] == 1 and int(new.skipped_steps) == 1
    assert_trees_close(new.params, state.params, rtol=0, atol=0)
