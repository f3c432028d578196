"""BLOOM's optimizer recipe: AdamW, its weight-decay mask, the token-driven learning-rate schedule
and Megatron's batch-size ramp-up.

Every run of BLOOM used (BigScience's tr11 scripts in bigscience-workshop/bigscience:
train/tr11-176B-ml/tr11-176B-ml.slurm and smaller_models/tr11{b,c,d,e,f}-*.slurm): gradients
clipped to global L2 norm 1.0, then Adam (b1 0.9, b2 0.95, eps 1e-8) with decoupled weight decay
0.1 on matrices only, at a learning rate that warms up linearly from 0 and then decays along a
cosine to a floor. Megatron measures that schedule in consumed samples rather than steps
because the global batch ramps up; here it is a function of consumed tokens (samples x sequence
length), which the train state carries.

Defaults are BLOOM-176B's; each gin file binds its size's values, e.g.

    learning_rate_schedule.peak_lr = 3e-4
    learning_rate_schedule.min_lr = 1e-5
    BatchRampUp.start = 192
    BatchRampUp.increment = 32
    BatchRampUp.global_batch_size = %BATCH_SIZE
    make_optimizer.weight_decay = 0.1
"""

from collections.abc import Callable
import dataclasses
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

BLOOM_SEQUENCE_LENGTH = 2048
# BLOOM's --lr-warmup-samples 183_105 and --lr-decay-samples 200_000_000, in tokens.
BLOOM_WARMUP_TOKENS = 183_105 * BLOOM_SEQUENCE_LENGTH  # 374,999,040 (~375M)
BLOOM_DECAY_TOKENS = 200_000_000 * BLOOM_SEQUENCE_LENGTH  # 409,600,000,000 (~410B)

# Parameters that get weight decay: matrices (Dense kernels, the tied embedding, LoRA's A and B).
# Biases and LayerNorm scale/bias are excluded, as in Megatron's parameter groups.
DECAYED_PARAM_NAMES = frozenset({"kernel", "embedding", "lora_a", "lora_b"})


# ------------------------------------------------------------------------------------------------
# Learning rate as a function of consumed tokens.


@gin.configurable
def learning_rate_schedule(
    consumed_tokens: jax.typing.ArrayLike,
    *,
    peak_lr: float = 6e-5,
    min_lr: float = 6e-6,
    warmup_tokens: float = BLOOM_WARMUP_TOKENS,
    decay_tokens: float = BLOOM_DECAY_TOKENS,
) -> jax.Array:
    """Megatron's AnnealingLR (cosine style) with tokens in place of samples; traceable.

    lr = peak * n / W                                          for n <= W (linear warmup from 0)
    lr = min + (peak - min) * 0.5 * (1 + cos(pi (n - W) / (D - W)))   for W < n <= D
    lr = min                                                   for n > D
    where n = tokens consumed before this step, W = warmup_tokens, D = decay_tokens. The count is
    taken in float32 (exact enough for a schedule; int32 would overflow past 2.1B tokens).
    """
    if not 0.0 <= min_lr <= peak_lr:
        raise ValueError(f"learning rates must satisfy 0 <= min_lr <= peak_lr; got min_lr={min_lr}, "
                         f"peak_lr={peak_lr}.")
    if not 0 <= warmup_tokens < decay_tokens:
        raise ValueError(f"need 0 <= warmup_tokens < decay_tokens; got warmup_tokens={warmup_tokens}, "
                         f"decay_tokens={decay_tokens}.")
    warmup_tokens, decay_tokens = float(warmup_tokens), float(decay_tokens)  # past int32's range
    n = jnp.asarray(consumed_tokens, jnp.float32)
    decay_ratio = jnp.clip((n - warmup_tokens) / (decay_tokens - warmup_tokens), 0.0, 1.0)
    cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * decay_ratio))
    lr = jnp.where(n > decay_tokens, min_lr, cosine)
    if warmup_tokens > 0:
        lr = jnp.where(n <= warmup_tokens, peak_lr * n / warmup_tokens, lr)
    return lr


# ------------------------------------------------------------------------------------------------
# Batch-size ramp-up (host side: the loop picks each step's batch before calling the step).


def batch_size_at(consumed_samples: int, start: int, increment: int, rampup_samples: int,
                  global_batch_size: int) -> int:
    """Global batch size (sequences) for a step, by Megatron's `--rampup-batch-size` rule.

    The batch grows from `start` by `increment` every rampup_samples / num_increments consumed
    samples and is `global_batch_size` once more than `rampup_samples` have been consumed.
    """
    _check_ramp(start, increment, rampup_samples, global_batch_size)
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0; got {consumed_samples}.")
    num_increments = (global_batch_size - start) // increment
    if num_increments == 0 or consumed_samples > rampup_samples:
        return global_batch_size
    samples_per_increment = rampup_samples / num_increments  # a float, as in Megatron
    return start + increment * int(consumed_samples / samples_per_increment)


def _check_ramp(start: int, increment: int, rampup_samples: int, global_batch_size: int) -> None:
    if start < 1 or increment < 1 or rampup_samples < 0:
        raise ValueError(f"batch ramp-up needs start >= 1, increment >= 1, rampup_samples >= 0; got "
                         f"start={start}, increment={increment}, rampup_samples={rampup_samples}.")
    if global_batch_size < start or (global_batch_size - start) % increment:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be start={start} plus a whole number of "
            f"increments of {increment}; change one of them (Megatron's --rampup-batch-size rule).")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BatchRampUp:
    """The batch-size ramp of a run (defaults: BLOOM-176B's `--rampup-batch-size 192 16 9_765_625`).

    Bind in gin, e.g. `BatchRampUp.global_batch_size = %BATCH_SIZE`; `start = BATCH_SIZE` (or
    `rampup_samples = 0`) turns the ramp off.
    """

    global_batch_size: int = 2048
    start: int = 192
    increment: int = 16
    rampup_samples: int = 9_765_625

    def __post_init__(self):
        _check_ramp(self.start, self.increment, self.rampup_samples, self.global_batch_size)

    def batch_size_at(self, consumed_samples: int) -> int:
        """Global batch size (sequences) of the step that starts after `consumed_samples`."""
        return batch_size_at(consumed_samples, self.start, self.increment, self.rampup_samples,
                             self.global_batch_size)


# ------------------------------------------------------------------------------------------------
# AdamW with BLOOM's mask, clipping and token-driven learning rate.


def weight_decay_mask(params: optax.Params) -> optax.Params:
    """True on leaves named `kernel` or `embedding` (decayed), False on biases and LayerNorm.

    The name is a leaf's last dict key, so boxed (`nn.Partitioned`) and plain trees both work.
    """
    def is_decayed(path, _):
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in DECAYED_PARAM_NAMES
    return jax.tree_util.tree_map_with_path(is_decayed, params)


class ScaleByTokenScheduleState(NamedTuple):
    """The learning rate applied by the last update (read it with `optax.tree.get`)."""

    learning_rate: jax.Array  # [] float32


def scale_by_token_schedule(
    learning_rate_fn: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
    """Scales updates by -learning_rate_fn(consumed_tokens), the count passed to `update`.

    optax's own schedules read the optimizer's step counter; with a ramping batch the schedule
    must follow tokens instead, and the train state (not a second counter in here) owns them.
    """
    def init_fn(params):
        del params
        return ScaleByTokenScheduleState(learning_rate=jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None, *, consumed_tokens=None, **extra_args):
        del state, params, extra_args
        if consumed_tokens is None:
            raise ValueError("this optimizer's update needs consumed_tokens=<tokens consumed before "
                             "this step> (the learning rate follows tokens); pass it from the "
                             "train state: tx.update(grads, opt_state, params, consumed_tokens=n).")
        learning_rate = jnp.asarray(learning_rate_fn(consumed_tokens), jnp.float32)
        return optax.tree.scale(-learning_rate, updates), ScaleByTokenScheduleState(learning_rate)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate_master_weights(weight_decay: float) -> optax.GradientTransformation:
    """An identity transform whose init refuses parameters the recipe cannot handle as given."""
    def init_fn(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} is {leaf.dtype}; the optimizer keeps "
                    "float32 master weights and state (set BloomConfig.param_dtype = 'float32' "
                    "and compute in bfloat16 with BloomConfig.dtype).")
        if weight_decay and not any(jax.tree.leaves(weight_decay_mask(params))):
            raise ValueError(
                f"weight_decay={weight_decay} would apply to no parameter: none is named one of "
                f"{sorted(DECAYED_PARAM_NAMES)}; pass the model's parameter tree, or set "
                "make_optimizer.weight_decay = 0.0.")
        return optax.EmptyState()

    return optax.GradientTransformation(init_fn, optax.identity().update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Megatron's clipping: above `max_norm`, gradients times max_norm / global norm.

    optax.clip_by_global_norm divides every gradient by the norm; XLA keeps a divided tensor
    (an expensive operation) in memory for its two readers in Adam, a float32 copy of every
    gradient (2 GiB at 560M). A multiply by one scalar fuses into Adam's update instead.
    """
    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)  # [] float32
        return optax.tree.scale(scale, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


@gin.configurable
def make_optimizer(
    learning_rate_fn: Callable[[jax.Array], jax.Array] = learning_rate_schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """BLOOM's optimizer: clip to global norm, Adam, decoupled weight decay on matrices, -lr.

    The order is Megatron's (clip the raw gradient, then Adam) and the decay is AdamW's
    (p -= lr * (adam_update + weight_decay * p)), as apex FusedAdam did for BLOOM.
    Call `update(grads, opt_state, params, consumed_tokens=n)` with n the tokens consumed before
    this step; inside jit make n float32 (e.g. `consumed_samples.astype(jnp.float32) * seq_len`
    from an int32 sample count in the train state: int32 tokens would overflow past 2.1B).
    """
    return optax.chain(
        _validate_master_weights(weight_decay),
        clip_by_global_norm(clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.float32),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        scale_by_token_schedule(learning_rate_fn),
    )
