"""BLOOM's optimizer recipe against its published numbers (BigScience's tr11 slurm scripts) and
hand-written AdamW."""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bloom_jax import optim
from bloom_jax.model import BloomConfig, BloomForCausalLM

SEQ = 2048
# BLOOM-176B, in Megatron's units (samples), from bigscience-workshop/bigscience
# train/tr11-176B-ml/tr11-176B-ml.slurm.
PEAK, MIN = 6e-5, 6e-6
WARMUP_SAMPLES, DECAY_SAMPLES = 183_105, 200_000_000
RAMP_176B = optim.BatchRampUp(global_batch_size=2048, start=192, increment=16,
                              rampup_samples=9_765_625)


def megatron_lr(consumed_samples: int) -> float:
    """Megatron's AnnealingLR.get_lr (cosine, sample-based), written out independently."""
    if consumed_samples <= WARMUP_SAMPLES:
        return PEAK * consumed_samples / WARMUP_SAMPLES
    if consumed_samples > DECAY_SAMPLES:
        return MIN
    ratio = (consumed_samples - WARMUP_SAMPLES) / (DECAY_SAMPLES - WARMUP_SAMPLES)
    return MIN + (PEAK - MIN) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def simulate_run(ramp: optim.BatchRampUp, steps: int) -> np.ndarray:
    """Samples consumed before each step of a run, the batch picked by the ramp each step."""
    consumed = np.zeros(steps, np.int64)
    for step in range(1, steps):
        consumed[step] = consumed[step - 1] + ramp.batch_size_at(int(consumed[step - 1]))
    return consumed


# ------------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_bloom_defaults_are_its_warmup_and_decay_in_tokens():
    assert optim.BLOOM_WARMUP_TOKENS == 374_999_040  # "375M tokens"
    assert optim.BLOOM_DECAY_TOKENS == 409_600_000_000  # "410B tokens"


@pytest.mark.parametrize("samples, expected", [
    (0, 0.0),
    (WARMUP_SAMPLES // 2, PEAK * (WARMUP_SAMPLES // 2) / WARMUP_SAMPLES),  # mid-warmup ~ peak/2
    (WARMUP_SAMPLES, PEAK),  # end of warmup
    ((WARMUP_SAMPLES + DECAY_SAMPLES) // 2, None),  # mid-decay ~ (peak + min) / 2
    (50_000_000, None),
    (DECAY_SAMPLES, MIN),
    (DECAY_SAMPLES + 1, MIN),
    (220_000_000, MIN),  # --train-samples, the configured end
])
def test_lr_at_checked_points_matches_megatron(samples, expected):
    expected = megatron_lr(samples) if expected is None else expected
    lr = optim.learning_rate_schedule(samples * SEQ)  # the 176B defaults
    np.testing.assert_allclose(float(lr), expected, rtol=1e-5, atol=1e-12)


def test_lr_mid_decay_is_halfway_between_peak_and_min():
    mid = (optim.BLOOM_WARMUP_TOKENS + optim.BLOOM_DECAY_TOKENS) / 2
    np.testing.assert_allclose(float(optim.learning_rate_schedule(mid)), (PEAK + MIN) / 2, rtol=1e-5)


def test_lr_over_a_whole_simulated_run_with_ramp_up_under_jit():
    # 176B's released 95,000 steps: consumed samples follow the ramp, the lr follows samples.
    consumed = simulate_run(RAMP_176B, 95_001)
    lrs = jax.jit(optim.learning_rate_schedule)(consumed.astype(np.float32) * SEQ)
    expected = np.array([megatron_lr(int(c)) for c in consumed])
    np.testing.assert_allclose(np.asarray(lrs), expected, rtol=2e-5, atol=1e-12)
    end_of_warmup = int(np.argmax(consumed > WARMUP_SAMPLES))  # first step past warmup
    assert 900 < end_of_warmup < 1000  # 183,105 samples at batch ~192-208
    assert lrs[0] == 0.0 and float(lrs[end_of_warmup]) == pytest.approx(PEAK, rel=1e-4)
    assert np.all(np.diff(lrs[:end_of_warmup]) > 0) and np.all(np.diff(lrs[end_of_warmup:]) <= 0)


def test_lr_schedule_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="warmup_tokens < decay_tokens"):
        optim.learning_rate_schedule(0, warmup_tokens=10, decay_tokens=10)
    with pytest.raises(ValueError, match="min_lr <= peak_lr"):
        optim.learning_rate_schedule(0, peak_lr=1e-5, min_lr=1e-4)


def test_lr_without_warmup_starts_at_peak():
    assert float(optim.learning_rate_schedule(0, warmup_tokens=0, decay_tokens=100)) == pytest.approx(PEAK)


# ------------------------------------------------------------------------------------------------
# Batch-size ramp-up


def test_176b_ramp_matches_megatron_arithmetic():
    per_increment = 9_765_625 / 116  # ~84,186.4 samples per +16
    assert RAMP_176B.batch_size_at(0) == 192
    assert RAMP_176B.batch_size_at(84_186) == 192
    assert RAMP_176B.batch_size_at(84_187) == 208
    assert RAMP_176B.batch_size_at(int(50 * per_increment) + 1) == 192 + 50 * 16
    assert RAMP_176B.batch_size_at(9_765_624) == 2032
    assert RAMP_176B.batch_size_at(9_765_626) == 2048
    assert RAMP_176B.batch_size_at(400_000_000) == 2048


def test_176b_ramp_reaches_full_batch_after_20b_tokens_near_step_12_7k():
    consumed, step = 0, 0
    seen = set()
    while (batch := RAMP_176B.batch_size_at(consumed)) < 2048:
        seen.add(batch)
        consumed, step = consumed + batch, step + 1
    assert seen == set(range(192, 2048, 16))
    # Full GBS once more than 9,765,625 samples are consumed, i.e. within one batch of it.
    assert 9_765_625 < consumed <= 9_765_625 + 2048
    assert consumed * SEQ / 1e9 == pytest.approx(20.0, abs=0.01)  # "~20B tokens"
    assert 12_600 < step < 12_800  # chronicles: full GBS at iteration ~12.7k


def test_module_function_is_the_same_rule():
    assert optim.batch_size_at(84_187, 192, 16, 9_765_625, 2048) == 208
    assert optim.batch_size_at(10, 256, 32, 0, 256) == 256  # no ramp


def test_inconsistent_ramps_fail_with_the_numbers():
    with pytest.raises(ValueError, match="whole number of increments"):
        optim.BatchRampUp(global_batch_size=2040, start=192, increment=16)
    with pytest.raises(ValueError, match="start >= 1"):
        optim.batch_size_at(0, 0, 16, 100, 256)


# ------------------------------------------------------------------------------------------------
# Weight-decay mask


def model_params_shape():
    config = BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda: BloomForCausalLM(config).init(jax.random.PRNGKey(0), ids))
    return variables["params"]


@pytest.mark.parametrize("unbox", [True, False])
def test_weight_decay_mask_picks_exactly_kernels_and_embedding(unbox):
    params = model_params_shape()
    params = nn.unbox(params) if unbox else params
    mask = optim.weight_decay_mask(params)
    decayed = {jax.tree_util.keystr(path) for path, on in jax.tree_util.tree_leaves_with_path(mask) if on}
    assert {d.removesuffix(".value") for d in decayed} == {
        "['word_embeddings']['embedding']",
        "['h']['self_attention']['query_key_value']['kernel']",
        "['h']['self_attention']['dense']['kernel']",
        "['h']['mlp']['dense_h_to_4h']['kernel']",
        "['h']['mlp']['dense_4h_to_h']['kernel']",
    }
    assert len(jax.tree.leaves(mask)) == 17  # the other 12: four biases and eight LayerNorm scale/bias


# ------------------------------------------------------------------------------------------------
# One optimizer step against hand-written AdamW


def adamw_reference(params, grads_per_step, tokens_per_step, lr_fn, b1=0.9, b2=0.95, eps=1e-8,
                    weight_decay=0.1, clip=1.0):
    """Megatron/apex AdamW in float64 numpy: clip, Adam with bias correction, decoupled decay."""
    decayed = {"kernel": True, "bias": False, "scale": False}
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, tokens) in enumerate(zip(grads_per_step, tokens_per_step), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        lr = float(lr_fn(tokens))
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            p[k] = p[k] - lr * (update + (weight_decay * p[k] if decayed[k] else 0.0))
    return p


def test_two_steps_equal_hand_written_adamw():
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,)),
              "scale": 1 + rng.normal(size=(4,))}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    # Norms ~6 (clipped) then ~0.3 (not clipped).
    grads = [{k: jnp.asarray(rng.normal(size=v.shape) * s, jnp.float32) for k, v in params.items()}
             for s in (2.0, 0.1)]
    tokens = [150e6, 200e9]  # one in warmup, one in decay
    lr_fn = lambda n: optim.learning_rate_schedule(n, peak_lr=1e-2, min_lr=1e-3)  # noqa: E731
    tx = optim.make_optimizer(lr_fn)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, n: tx.update(g, s, p, consumed_tokens=n))
    ours = params
    for g, n in zip(grads, tokens):
        updates, state = update(g, state, ours, n)
        ours = optax.apply_updates(ours, updates)
    expected = adamw_reference(params, grads, tokens, lr_fn)
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), expected[k], rtol=1e-5, atol=1e-7)
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(float(lr_fn(tokens[-1])))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.floating))


def test_optimizer_refuses_low_precision_masters_and_missing_tokens():
    tx = optim.make_optimizer()
    params = {"kernel": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"\['kernel'\] is bfloat16.*float32 master weights"):
        tx.init({"kernel": jnp.ones((2, 2), jnp.bfloat16)})
    with pytest.raises(ValueError, match="consumed_tokens"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="would apply to no parameter"):
        tx.init({"w": jnp.ones((2, 2))})


def test_gin_bindings_reach_the_schedule_inside_the_optimizer():
    gin.parse_config(["learning_rate_schedule.peak_lr = 3e-4",
                      "learning_rate_schedule.min_lr = 1e-5",
                      "make_optimizer.weight_decay = 0.0"])
    tx = optim.make_optimizer()
    params = {"bias": jnp.ones(3)}
    _, state = tx.update(params, tx.init(params), params,
                         consumed_tokens=optim.BLOOM_WARMUP_TOKENS)
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(3e-4)
