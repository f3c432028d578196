"""BLOOM's training loop, the gin entry point `train()` behind `python -m bloom_jax.train`.

The same loop runs a laptop smoke test and a multi-host cluster run: it builds the mesh, the data
stream and the sharded train state (fresh, restored from MODEL_DIR, or initialized from a
converted checkpoint), then runs the jitted step, logging metrics and saving checkpoints, and
saves and exits cleanly when the cluster preempts it (SIGTERM) or the user presses Ctrl-C.
(The command lives in train.py: a module run with `python -m` is `__main__`, and gin would
register its configurables twice.)
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Iterator
from typing import Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from bloom_jax import checkpoints, distributed, flops, metrics, optim, param_store
from bloom_jax import evaluate as evaluate_lib
from bloom_jax import step as step_lib
from bloom_jax.data import pipeline, vocabularies
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib
from partitioning import validation


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many skipped steps in a row)."""


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
    """The train step jitted for a mesh, with the shapes and shardings of what it consumes."""

    mesh: jax.sharding.Mesh
    rules: rules_lib.Rules
    model: BloomForCausalLM
    optimizer: optax.GradientTransformation
    abstract_state: step_lib.TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings
    state_shardings: step_lib.TrainState
    batch_sharding: jax.sharding.NamedSharding  # of [micro_batches, micro_batch, length] arrays
    step: Callable  # jitted (state, batch, batch_size) -> (state, metrics); donates the state

    def init_state(self, seed: int) -> step_lib.TrainState:
        """A fresh state, each device creating only its own shards."""
        ids = jnp.zeros((1, 1), jnp.int32)
        def init():
            params = self.model.init(jax.random.PRNGKey(seed), ids)["params"]
            return step_lib.create_train_state(params, self.optimizer, seed)
        return shardings_lib.init_sharded(init, self.state_shardings)


def shard_training(model_config: BloomConfig, mesh: jax.sharding.Mesh, rules: rules_lib.Rules,
                   micro_batch: int, sequence_length: int,
                   skip_policy: step_lib.SkipPolicy | None = None) -> ShardedTraining:
    """Lays the train state and batches out on `mesh` and jits the step for them.

    Raises partitioning's MeshError, naming each array the mesh does not divide and meshes that
    would, before anything is compiled. Used by the trainer, the planner and the benchmark.
    """
    model = BloomForCausalLM(model_config)
    optimizer = optim.make_optimizer()
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed_params = shardings_lib.abstract_params(model, ids)
    validation.check_mesh(mesh.shape, boxed_params, rules, (micro_batch, sequence_length))
    boxed_state = jax.eval_shape(
        lambda p: step_lib.create_train_state(p, optimizer, seed=0), boxed_params)
    state_shardings = shardings_lib.logical_shardings(boxed_state, mesh, rules)
    abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed_state), state_shardings)
    batch_sharding = shardings_lib.batch_sharding(mesh, rules, micro_batch_axis=True)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(
        step_lib.make_train_step(model, optimizer, skip_policy or step_lib.SkipPolicy()),
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return ShardedTraining(mesh, rules, model, optimizer, abstract_state, state_shardings,
                           batch_sharding, step)


def micro_batch_sequences(batch_size: int, micro_batch_size: int | None,
                          mesh: jax.sharding.Mesh) -> int:
    """Global sequences per micro-step: `micro_batch_size` per data-parallel shard (data x
    fsdp), or the whole `batch_size` when it is None."""
    if micro_batch_size is None:
        return batch_size
    return micro_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]


def stacked_batches(stream: Iterator[dict], micro_batches: int) -> dict[str, np.ndarray]:
    """The next `micro_batches` batches of the stream, stacked: [micro_batches, batch, length]."""
    batches = [next(stream) for _ in range(micro_batches)]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def restore_or_init(training: ShardedTraining, checkpointer: checkpoints.TrainCheckpointer,
                    stream: pipeline.PackedStream, seed: int,
                    init_from: str | None) -> step_lib.TrainState:
    """The latest checkpoint's state (and the stream moved to its data position), else a fresh
    state, with `init_from`'s parameters when given."""
    restored = checkpointer.restore(training.abstract_state)
    if restored is not None:
        state, data_state = restored
        stream.set_state(data_state)
        logging.info("Resumed from step %d of %s; data position restored.", int(state.step),
                     checkpointer.directory)
        return state
    state = training.init_state(seed)
    if init_from:
        _, params = param_store.load_params(init_from, training.model.config,
                                            training.state_shardings.params)
        state = state.replace(params=params)
        logging.info("Parameters initialized from %s.", init_from)
    return state


@gin.configurable
def train(
    *,
    model_dir: str | None = gin.REQUIRED,
    model_config: BloomConfig = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    seed: int = 42,
    micro_batch_size: int | None = None,
    log_every: int = 10,
    init_from: str | None = None,
    batch_ramp: optim.BatchRampUp | None = None,
    skip_policy: step_lib.SkipPolicy | None = None,
    eval_every: int = 0,
    eval_batch_size: int | None = None,
) -> step_lib.TrainState:
    """Trains until `train_steps` optimizer steps (restored ones included); returns the state.

    micro_batch_size: sequences per data-parallel shard per micro-step (Megatron's MBS); a global
      batch is accumulated over ceil(batch / (micro_batch_size x data x fsdp)) micro-steps, rows
      beyond the batch masked out. None: one micro-step holds the whole global batch.
    init_from: a checkpoint directory (e.g. from `bloom_jax.convert from_hf`) whose parameters a
      fresh run starts from; ignored when MODEL_DIR already has a checkpoint to resume.
    eval_every: every N steps and at the end, log `eval/{loss,perplexity,bits_per_byte}/<task>`
      on each task's validation split (and "all", blended); 0: no evaluation.
    eval_batch_size: global sequences per eval forward pass; None: the micro-step's.
    Gin: `train.eval_every = 1000`, `train.eval_batch_size = 64`.
    """
    if model_dir is None:
        raise ValueError("MODEL_DIR is not set: pass --gin.MODEL_DIR=/path/to/run (checkpoints, "
                         "TensorBoard events and the operative config are written there).")
    model_dir = pathlib.Path(model_dir).absolute()
    batch_ramp = batch_ramp or optim.BatchRampUp()
    skip_policy = skip_policy or step_lib.SkipPolicy()
    distributed.initialize()

    mesh = mesh_lib.create_mesh()
    rules = rules_lib.logical_axis_rules()
    micro_batch = micro_batch_sequences(batch_ramp.global_batch_size, micro_batch_size, mesh)
    stream = pipeline.make_stream(batch_size=micro_batch)
    vocabularies.check_fits_model(stream.vocabulary, model_config.vocab_size)
    training = shard_training(model_config, mesh, rules, micro_batch, stream.sequence_length,
                              skip_policy)
    logging.info("Mesh %s; %s parameters; %d sequences of %d tokens per micro-step.",
                 dict(mesh.shape), f"{flops.param_count(model_config):,}", micro_batch,
                 stream.sequence_length)
    if eval_every:
        eval_batch_size = eval_batch_size or micro_batch
        evaluate_lib.check_batch_size(mesh, rules, eval_batch_size, stream.sequence_length)
        eval_streams = pipeline.validation_streams(
            vocabulary=stream.vocabulary, sequence_length=stream.sequence_length,
            batch_size=eval_batch_size)

    checkpointer = checkpoints.TrainCheckpointer(model_dir / "checkpoints", model_config)
    state = restore_or_init(training, checkpointer, stream, seed, init_from)
    if jax.process_index() == 0:
        (model_dir / "config.gin").write_text(gin.config_str())

    logger = metrics.MetricsLogger(model_dir, total_steps=train_steps)
    recompute = model_config.remat_policy != "none"
    sequence_flops = flops.flops_per_token(model_config, stream.sequence_length,
                                           recompute) * stream.sequence_length
    peak = flops.peak_flops(jax.devices()[0], model_config.dtype.name)
    step, consumed = int(state.step), int(state.consumed_samples)
    consecutive_skips = 0
    try:
        with rules_lib.activation_sharding(mesh, rules):
            while step < train_steps:
                start = time.perf_counter()
                batch_size = batch_ramp.batch_size_at(consumed)
                micro_batches = -(-batch_size // micro_batch)
                batch = shardings_lib.put_batch(stacked_batches(stream, micro_batches),
                                                training.batch_sharding)
                state, step_metrics = training.step(state, batch, batch_size)
                step_metrics = jax.device_get(step_metrics)
                step_time = time.perf_counter() - start
                step, consumed = step + 1, consumed + batch_size

                consecutive_skips = consecutive_skips + 1 if step_metrics["skipped"] else 0
                if step % log_every == 0 or step in (1, train_steps) or step_metrics["skipped"]:
                    step_flops = sequence_flops * batch_size
                    logger.write_scalars(step, {
                        **{k: step_metrics[k] for k in ("loss", "learning_rate", "grad_norm")},
                        "batch_size": batch_size,
                        "tokens_seen": consumed * stream.sequence_length,
                        "step_time_s": step_time,
                        "tokens_per_s": batch_size * stream.sequence_length / step_time,
                        "tflops_per_device": flops.tflops_per_device(
                            step_flops, step_time, jax.device_count()),
                        "mfu": flops.mfu(step_flops, step_time, jax.device_count(), peak),
                        "skipped_steps": int(state.skipped_steps),
                    })
                if consecutive_skips > skip_policy.max_consecutive:
                    raise TrainingError(
                        f"{consecutive_skips} steps in a row were skipped (non-finite or spiking "
                        f"loss), the last at step {step}. Restart from the last checkpoint with "
                        "a lower learning rate, or a data seed that skips the offending batches.")
                if eval_every and (step % eval_every == 0 or step == train_steps):
                    results = evaluate_lib.evaluate(training.model, state.params, eval_streams,
                                                    mesh=mesh, rules=rules)
                    logger.write_scalars(step, evaluate_lib.eval_scalars(results))
                logger.progress(step)
                preempted = distributed.reached_preemption(step)
                checkpointer.save(state, stream.get_state(),
                                  force=preempted or step == train_steps)
                if preempted:
                    logging.warning("Preempted: checkpoint of step %d saved; exiting.", step)
                    break
    finally:
        checkpointer.close()
        logger.close()
    return state
