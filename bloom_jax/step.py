"""The train state, the loss, and the train and eval steps: pure functions, jitted by the caller.

A train step consumes one global batch split into micro-batches ([micro_batches, micro_batch,
length] per feature), accumulates float32 gradients over them, and applies one optimizer update,
unless the step's loss or gradient is not finite, or the update would make a parameter non-finite
(or the loss spikes, when a spike rule is set): then the update is skipped and counted, as
BLOOM's operators did by hand with `--skip-train-iteration-range`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax

from bloom_jax import lm_head

Batch = dict[str, jax.Array]
# (params, batch, dropout key or None) -> (summed token losses, summed loss weights)
LossFn = Callable[[Any, Batch, "jax.Array | None"], tuple[jax.Array, jax.Array]]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree (checkpointed whole)."""

    step: jax.Array  # [] int32: steps taken, skipped ones included
    params: Any  # float32 master weights
    opt_state: Any
    consumed_samples: jax.Array  # [] int32: sequences consumed; drives the lr and the batch ramp
    skipped_steps: jax.Array  # [] int32: updates not applied (non-finite or spiking)
    loss_ema: jax.Array  # [] float32: moving average of applied losses, for the spike rule
    rng: jax.Array  # [2] uint32: base key for dropout, folded with the step


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
    """A fresh state at step 0 (jit it with out_shardings to create it sharded)."""
    zero = jnp.zeros([], jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      consumed_samples=zero, skipped_steps=zero,
                      loss_ema=jnp.zeros([], jnp.float32), rng=jax.random.PRNGKey(seed))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SkipPolicy:
    """When an update is skipped: always on a non-finite loss, gradient norm or updated parameter;
    also when the loss exceeds `spike_factor` times its moving average (None: no spike rule).
    The loop stops the run after `max_consecutive` skips in a row."""

    spike_factor: float | None = None
    ema_decay: float = 0.99
    max_consecutive: int = 10


def cross_entropy(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy in float32 and the summed loss weights."""
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])  # [batch, length]
    weights = batch["loss_weights"].astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def loss_sums(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None,
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, sum of weights) of a packed batch; dropout on when rng is given.
    With `loss_vocab_chunks` > 1 the tied head runs a vocabulary slice at a time (lm_head.py)."""
    chunks = model.config.loss_vocab_chunks
    outputs = model.apply(
        {"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
        positions=batch["positions"], deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng}, head=chunks == 1)
    if chunks == 1:
        return cross_entropy(outputs, batch)
    weights = batch["loss_weights"].astype(jnp.float32)
    loss = lm_head.cross_entropy_sum(
        outputs.reshape(-1, outputs.shape[-1]), params["word_embeddings"]["embedding"],
        batch["targets"].reshape(-1), weights.reshape(-1), chunks, model.config.dtype)
    return loss, jnp.sum(weights)


def eval_step(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, sum of weights) without dropout: the evaluation and the trainer
    share it."""
    return loss_sums(model, params, batch)


def uses_dropout(config: Any) -> bool:
    """Whether the model's training forward pass draws dropout masks."""
    return config.hidden_dropout > 0 or config.attention_dropout > 0


def train_step(state: TrainState, batch: Batch, batch_size: jax.Array, *, loss: LossFn,
               use_dropout: bool, optimizer: optax.GradientTransformation,
               skip_policy: SkipPolicy = SkipPolicy(), pipeline_pass: int | None = None,
               gather: Callable | None = None, scatter: Callable | None = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of `state.params` over a global batch of [micro_batches, micro_batch,
    length] arrays; `loss(params, micro_batch, rng)` gives (summed losses, summed weights), with
    a dropout key when `use_dropout`. `pipeline_pass`: the loss takes that many micro-batches at
    once, [pipeline_pass, micro_batch, length] (a pipelined model keeps them in flight together),
    per accumulation step; None: one.

    `gather` (params -> the weights every micro-step reads) runs once per step, outside the
    micro-step loop, and `scatter` lays each micro-step's gradients out as the float32
    accumulators: with FSDP, weights gathered once instead of at every micro-step.

    Only the first `batch_size` sequences count: when the mesh's data-parallel size does not
    divide the batch (384 GPUs = 3 x 128 against BLOOM's 2048), the last micro-batch is filled
    up with rows whose loss weight is zeroed here, and the step stays BLOOM's batch. Only the
    first ceil(batch_size / micro_batch) micro-batches run: a smaller batch of the ramp comes in
    the same [micro_batches, ...] buffer, its unused micro-batches padding.
    """
    micro_batches, micro_batch, length = batch["input_ids"].shape
    rows = jnp.arange(micro_batches * micro_batch).reshape(micro_batches, micro_batch)
    batch = {**batch, "loss_weights": batch["loss_weights"] * (rows < batch_size)[..., None]}
    rows_per_step = micro_batch * (pipeline_pass or 1)
    if pipeline_pass:
        batch = jax.tree.map(lambda x: x.reshape(-1, pipeline_pass, *x.shape[1:]), batch)
    accumulation_steps = batch["input_ids"].shape[0]
    step_rng = jax.random.fold_in(state.rng, state.step)
    weights = state.params if gather is None else gather(state.params)
    # The step's loss is a mean over all its tokens. Each micro-step differentiates its share of
    # it (its summed losses over the whole step's weight), so the accumulated gradients come out
    # as the mean's: dividing them afterwards wrote a second float32 copy of all of them.
    weight_sum = jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)

    def share(p, micro, rng):
        micro_loss, _ = loss(p, micro, rng)
        return micro_loss / weight_sum, micro_loss

    def accumulate(index, carry):
        grads, loss_sum = carry
        micro = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False),
                             batch)
        rng = jax.random.fold_in(step_rng, index) if use_dropout else None
        (_, micro_loss), micro_grads = jax.value_and_grad(share, has_aux=True)(weights, micro, rng)
        if scatter is not None:
            micro_grads = scatter(micro_grads)
        grads = jax.tree_util.tree_map(jnp.add, grads, micro_grads)
        return grads, loss_sum + micro_loss

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), state.params)
    init = (zeros, jnp.zeros([], jnp.float32))
    if accumulation_steps == 1:  # no loop: XLA fuses the step whole
        grads, loss_sum = accumulate(0, init)
    else:
        # A traced trip count: the batch ramp changes how many micro-steps run, never the
        # shapes, so one compiled step serves the run; micro-steps past it are never read.
        used = jnp.minimum(accumulation_steps, (batch_size + rows_per_step - 1) // rows_per_step)
        grads, loss_sum = jax.lax.fori_loop(0, used, accumulate, init)
    loss = loss_sum / weight_sum
    grad_norm = optax.global_norm(grads)

    consumed_tokens = state.consumed_samples.astype(jnp.float32) * length

    def updated() -> tuple[Any, Any]:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params,
                                              consumed_tokens=consumed_tokens)
        return optax.apply_updates(state.params, updates), opt_state

    # An update that would make a parameter non-finite (an infinite learning rate, an overflow
    # in Adam) is skipped like a non-finite loss, so no non-finite parameter is ever kept. The
    # check computes the update into a reduction only, and the update is computed again inside
    # `cond`, where XLA writes it over the donated state: selecting between the new and old
    # state instead held a whole new copy of it (2.3 GiB more at 560M).
    checked_params, checked_opt_state = updated()
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                       for p in jax.tree_util.tree_leaves(checked_params)]))
    apply = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    if skip_policy.spike_factor is not None:
        spiking = (state.loss_ema > 0) & (loss > skip_policy.spike_factor * state.loss_ema)
        apply = apply & ~spiking
    params, opt_state = jax.lax.cond(apply, updated, lambda: (state.params, state.opt_state))
    ema = jnp.where(state.loss_ema > 0,
                    skip_policy.ema_decay * state.loss_ema + (1 - skip_policy.ema_decay) * loss,
                    loss)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        consumed_samples=state.consumed_samples + batch_size,
        skipped_steps=state.skipped_steps + (~apply).astype(jnp.int32),
        loss_ema=jnp.where(apply, ema, state.loss_ema),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": optax.tree.get(checked_opt_state, "learning_rate"),
        "skipped": (~apply).astype(jnp.int32),
        "tokens": weight_sum,
    }
    return new_state, metrics


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    skip_policy: SkipPolicy = SkipPolicy(),
                    pipeline_pass: int | None = None, gather: Callable | None = None,
                    scatter: Callable | None = None) -> Callable:
    """train_step with the model, optimizer, skip policy (and gather, scatter) bound:
    (state, batch, batch_size) -> (state, metrics). A pipelined model takes `pipeline_pass`
    micro-batches at once (None: all of the step's)."""
    def step(state: TrainState, batch: Batch, batch_size: jax.Array):
        micro_batches = pipeline_pass or batch["input_ids"].shape[0]
        return train_step(state, batch, batch_size, loss=functools.partial(loss_sums, model),
                          use_dropout=uses_dropout(model.config), optimizer=optimizer,
                          skip_policy=skip_policy,
                          pipeline_pass=micro_batches if model.stages > 1 else None,
                          gather=gather, scatter=scatter)
    return step
