"""BLOOM's recipe scaled to a size and token count, its gin config and checkpoint size."""

import gin
import pytest

from bloom_jax import configs, flops, optim, recipe, sharded_step
from bloom_jax import trainer  # noqa: F401  registers every configurable a training config binds
from bloom_jax.model import BloomConfig

BLOOM_176B = recipe.BLOOM_SIZES[-1]


def test_bloom_176b_on_its_planned_tokens_gets_its_own_recipe():
    result = recipe.bloom_recipe(BLOOM_176B.params, recipe.BLOOM_TRAIN_TOKENS, 2048)
    assert (result.batch_size, result.ramp.start, result.ramp.increment) == (2048, 192, 16)
    assert result.ramp.rampup_samples == optim.BatchRampUp().rampup_samples
    assert (result.warmup_tokens, result.decay_tokens) == (optim.BLOOM_WARMUP_TOKENS,
                                                           optim.BLOOM_DECAY_TOKENS)
    assert (result.peak_lr, result.min_lr) == pytest.approx((6e-5, 6e-6))


def test_schedule_keeps_its_share_of_the_run_and_lr_falls_between_sizes():
    half = recipe.bloom_recipe(2e9, recipe.BLOOM_TRAIN_TOKENS / 2, 2048)
    assert half.warmup_tokens == pytest.approx(optim.BLOOM_WARMUP_TOKENS / 2, abs=1)
    assert half.decay_tokens == pytest.approx(optim.BLOOM_DECAY_TOKENS / 2, abs=1)
    assert 1.6e-4 < half.peak_lr < 2.0e-4  # between BLOOM-1b7's and BLOOM-3b's
    assert half.batch_size == 512


def test_steps_consume_the_tokens_through_the_ramp():
    ramp = optim.BatchRampUp(global_batch_size=256, start=192, increment=32, rampup_samples=5000)
    steps = recipe.steps_for(2048 * 20_000, ramp, 2048)
    consumed = 0
    for _ in range(steps - 1):
        consumed += ramp.batch_size_at(consumed)
    assert consumed < 20_000 <= consumed + ramp.batch_size_at(consumed)


def test_checkpoint_holds_float32_parameters_and_two_adam_moments():
    config = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8)
    size = recipe.checkpoint_bytes(config)
    assert 12 * flops.param_count(config) <= size < 12 * flops.param_count(config) + 1024


def test_gin_config_parses_to_the_planned_workload(tmp_path):
    config = BloomConfig(vocab_size=250880, hidden_size=256, n_layer=3, n_head=4,
                         hidden_dropout=0.1, attention_dropout=0.1, remat_policy="full")
    planned = recipe.bloom_recipe(flops.param_count(config), 1e9, 1024)
    text = recipe.gin_config(config, planned, {"data": 2, "fsdp": 1, "tensor": 1}, 2, 50,
                             header="a test\nof two lines")
    assert text.startswith("# a test\n# of two lines\ninclude 'base.gin'\n")
    (tmp_path / "planned.gin").write_text(text)
    configs.parse([str(tmp_path / "planned.gin")])
    workload = sharded_step.Workload()
    assert workload.model_config.n_layer == 3 and workload.model_config.remat_policy == "full"
    assert (workload.batch_size, workload.sequence_length, workload.micro_batch_size) == (
        planned.batch_size, 1024, 2)
    assert gin.query_parameter("learning_rate_schedule.decay_tokens") == planned.decay_tokens
    assert gin.get_bindings("train")["train_steps"] == planned.train_steps
