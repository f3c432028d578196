"""BLOOM's training recipe carried to another size and token count, the gin config that runs it,
and the checkpoints it writes.

BLOOM's six runs (reference facts §3.1-3.2) share one schedule planned for a 450B-token run
(--train-samples 220M): warmup over 375M tokens, cosine decay to 410B tokens, and a batch ramp
from 192 sequences to the full batch over 20B tokens; the batch, its ramp increment and the
learning rates vary with size. Here the token-measured parts keep their share of the planned
run, the batch and increment are those of the BLOOM size nearest in parameters, and the peak
and final learning rates are interpolated log-log in parameters between BLOOM's sizes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from bloom_jax import optim, param_store, step
from bloom_jax.model import BloomConfig

BLOOM_TRAIN_TOKENS = 220_000_000 * optim.BLOOM_SEQUENCE_LENGTH  # the run BLOOM's schedule planned
BLOOM_RAMP_START = 192


@dataclasses.dataclass(frozen=True)
class BloomSize:
    """One of BLOOM's runs: parameters, global batch, ramp increment, learning rates (§3.2)."""

    params: int
    batch_size: int
    increment: int
    peak_lr: float
    min_lr: float


BLOOM_SIZES = (
    BloomSize(559_214_592, 256, 32, 3.0e-4, 1e-5),
    BloomSize(1_065_314_304, 256, 16, 2.5e-4, 1e-5),
    BloomSize(1_722_408_960, 512, 16, 2.0e-4, 1e-5),
    BloomSize(3_002_557_440, 512, 32, 1.6e-4, 1e-5),
    BloomSize(7_069_016_064, 512, 32, 1.2e-4, 1e-5),
    BloomSize(176_247_271_424, 2048, 16, 6.0e-5, 6e-6),
)
# BLOOM-176B saved every 100 iterations of 105.22 s (reference facts §3.3): about every 3 hours.
BLOOM_CHECKPOINT_EVERY_S = 100 * 105.22


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a gin config binds besides the model and the mesh."""

    tokens: float  # planned training tokens
    sequence_length: int
    batch_size: int
    ramp: optim.BatchRampUp
    peak_lr: float
    min_lr: float
    warmup_tokens: int
    decay_tokens: int
    train_steps: int


def _log_interpolate(params: float, values: list[float]) -> float:
    """values (one per BLOOM size) at `params`, linear in log-log, constant beyond the ends."""
    sizes = [math.log(size.params) for size in BLOOM_SIZES]
    return float(np.exp(np.interp(math.log(params), sizes, np.log(values))))


def steps_for(tokens: float, ramp: optim.BatchRampUp, sequence_length: int) -> int:
    """Optimizer steps until `tokens` are consumed, the ramp's smaller batches included."""
    target = math.ceil(tokens / sequence_length)
    steps = consumed = 0
    while consumed < ramp.rampup_samples and consumed < target:
        consumed += ramp.batch_size_at(consumed)
        steps += 1
    return steps + max(0, -(-(target - consumed) // ramp.global_batch_size))


def bloom_recipe(params: int, tokens: float, sequence_length: int) -> Recipe:
    """BLOOM's recipe for a model of `params` parameters trained on `tokens` tokens."""
    nearest = min(BLOOM_SIZES, key=lambda size: abs(math.log(size.params / params)))
    share = tokens / BLOOM_TRAIN_TOKENS
    rampup_tokens = optim.BatchRampUp().rampup_samples * optim.BLOOM_SEQUENCE_LENGTH
    ramp = optim.BatchRampUp(global_batch_size=nearest.batch_size, start=BLOOM_RAMP_START,
                             increment=nearest.increment,
                             rampup_samples=round(rampup_tokens * share / sequence_length))
    return Recipe(
        tokens=tokens, sequence_length=sequence_length, batch_size=nearest.batch_size, ramp=ramp,
        peak_lr=_log_interpolate(params, [size.peak_lr for size in BLOOM_SIZES]),
        min_lr=_log_interpolate(params, [size.min_lr for size in BLOOM_SIZES]),
        warmup_tokens=round(optim.BLOOM_WARMUP_TOKENS * share),
        decay_tokens=round(optim.BLOOM_DECAY_TOKENS * share),
        train_steps=steps_for(tokens, ramp, sequence_length))


def checkpoint_bytes(config: BloomConfig) -> int:
    """Bytes of one trainer checkpoint: the train state it saves (float32 parameters, Adam's two
    float32 moments, counters), computed from its abstract shapes; the data position is a few
    hundred bytes of JSON more."""
    state = jax.eval_shape(
        lambda params: step.create_train_state(params, optim.make_optimizer(), seed=0),
        param_store.abstract_params(config))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def checkpoint_every(step_s: float) -> int:
    """Steps between saves to keep BLOOM's interval in hours."""
    return max(1, round(BLOOM_CHECKPOINT_EVERY_S / step_s))


def gin_config(config: BloomConfig, recipe: Recipe, mesh: dict[str, int],
               micro_batch_size: int, checkpoint_steps: int, header: str) -> str:
    """A ready-to-run gin config (it includes base.gin) for `config` trained by `recipe`."""
    ramp = recipe.ramp
    return "\n".join([
        *(f"# {line}" for line in header.splitlines()),
        "include 'base.gin'",
        "",
        f"BloomConfig.n_layer = {config.n_layer}",
        f"BloomConfig.hidden_size = {config.hidden_size}",
        f"BloomConfig.n_head = {config.n_head}",
        f"BloomConfig.hidden_dropout = {config.hidden_dropout}",
        f"BloomConfig.attention_dropout = {config.attention_dropout}",
        f"BloomConfig.remat_policy = '{config.remat_policy}'",
        "",
        f"BATCH_SIZE = {recipe.batch_size}",
        f"SEQUENCE_LENGTH = {recipe.sequence_length}",
        f"TRAIN_STEPS = {recipe.train_steps}",
        f"BatchRampUp.start = {ramp.start}",
        f"BatchRampUp.increment = {ramp.increment}",
        f"BatchRampUp.rampup_samples = {ramp.rampup_samples}",
        f"learning_rate_schedule.peak_lr = {recipe.peak_lr:.3g}",
        f"learning_rate_schedule.min_lr = {recipe.min_lr:.3g}",
        f"learning_rate_schedule.warmup_tokens = {recipe.warmup_tokens}",
        f"learning_rate_schedule.decay_tokens = {recipe.decay_tokens}",
        f"MICRO_BATCH_SIZE = {micro_batch_size}",
        "train.eval_every = 1000  # BLOOM's --eval-interval; `plan --fit` reads eval/loss/all",
        f"CheckpointOptions.every_steps = {checkpoint_steps}",
        "",
        *(f"create_mesh.{axis} = {size}" for axis, size in mesh.items()),
        "",
    ])
