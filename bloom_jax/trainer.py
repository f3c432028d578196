"""BLOOM's training loop, the gin entry point `train()` behind `python -m bloom_jax.train`.

The same loop runs a laptop smoke test and a multi-host cluster run: it builds the mesh, the data
stream and the sharded train state (fresh, restored from MODEL_DIR, or initialized from a
converted checkpoint), then runs the jitted step, logging metrics and saving checkpoints, and
saves and exits cleanly when the cluster preempts it (SIGTERM) or the user presses Ctrl-C.
(The command lives in train.py: a module run with `python -m` is `__main__`, and gin would
register its configurables twice.)
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterator

import gin
import jax
import numpy as np
from absl import logging

from bloom_jax import checkpoints, distributed, evaluation, flops, lora as lora_lib, metrics
from bloom_jax import param_store, sharded_step
from bloom_jax import step as step_lib
from bloom_jax.data import instructions, pipeline, vocabularies
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many skipped steps in a row)."""


def stacked_batches(stream: Iterator[dict], micro_steps: int) -> dict[str, np.ndarray]:
    """The next `micro_steps` batches of the stream, stacked: [micro_steps, batch, length]."""
    batches = [next(stream) for _ in range(micro_steps)]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def restore_or_init(training: sharded_step.ShardedTraining,
                    checkpointer: checkpoints.TrainCheckpointer,
                    stream: pipeline.PackedStream | instructions.InstructionStream, seed: int,
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


def load_lora_base(training: sharded_step.ShardedTraining, init_from: str | None) -> tuple:
    """LoRA's frozen base, sharded as training shards parameters, as the step's extra argument;
    () without LoRA. Logs the optimizer memory the adapters save."""
    if training.workload.lora is None:
        return ()
    if not init_from:
        raise ValueError("LoRA trains adapters on a frozen base model: set INIT_FROM "
                         "(--gin.INIT_FROM=/ckpt/bloom560m, a converted checkpoint).")
    _, base = param_store.load_params(init_from, training.model.config, training.base_shardings)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    state_bytes = sum(x.size * x.dtype.itemsize
                      for x in jax.tree.leaves(training.abstract_state.opt_state))
    full_bytes = 2 * 4 * count(base)  # Adam's float32 mu and nu for every parameter
    logging.info("LoRA: %s adapter parameters on a frozen base of %s (from %s); optimizer state "
                 "%sB instead of %sB for full fine-tuning: %sB saved.",
                 metrics.human(count(training.abstract_state.params)), metrics.human(count(base)),
                 init_from, metrics.human(state_bytes), metrics.human(full_bytes),
                 metrics.human(full_bytes - state_bytes))
    return (base,)


@gin.configurable
def train(
    *,
    model_dir: str | None = gin.REQUIRED,
    workload: sharded_step.Workload = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    seed: int = 42,
    log_every: int = 10,
    init_from: str | None = None,
    skip_policy: step_lib.SkipPolicy | None = None,
    eval_every: int = 0,
    eval_batch_size: int | None = None,
    make_stream: Callable[..., Iterator[dict]] = pipeline.make_stream,
) -> step_lib.TrainState:
    """Trains until `train_steps` optimizer steps (restored ones included); returns the state.

    workload: the model, batch (and its ramp), sequence length and micro-batch of each step.
    init_from: a checkpoint directory (e.g. from `bloom_jax.convert from_hf`) whose parameters a
      fresh run starts from; ignored when MODEL_DIR already has a checkpoint to resume.
    eval_every: every N steps and at the end, log `eval/{loss,perplexity,bits_per_byte}/<task>`
      on each task's validation split (and "all", blended); 0: no evaluation.
    eval_batch_size: global sequences per eval forward pass; None: the micro-step's.
    make_stream: the training data, (batch_size=, sequence_length=) -> a stream with
      `vocabulary`, `get_state` and `set_state`: the ROOTS mixture (pretraining) or
      `make_instruction_stream` (instruction fine-tuning, gin_configs/sft.gin).
    Gin: `train.eval_every = 1000`, `train.eval_batch_size = 64`.
    """
    if model_dir is None:
        raise ValueError("MODEL_DIR is not set: pass --gin.MODEL_DIR=/path/to/run (checkpoints, "
                         "TensorBoard events and the operative config are written there).")
    model_dir = pathlib.Path(model_dir).absolute()
    skip_policy = skip_policy or step_lib.SkipPolicy()
    distributed.initialize()

    model_config, sequence_length = workload.model_config, workload.sequence_length
    mesh = mesh_lib.create_mesh()
    rules = rules_lib.logical_axis_rules()
    training = sharded_step.shard_training(workload, mesh, rules, skip_policy)
    stream = make_stream(batch_size=training.micro_batch, sequence_length=sequence_length)
    vocabularies.check_fits_model(stream.vocabulary, model_config.vocab_size)
    logging.info("Mesh %s; %s parameters; %d sequences of %d tokens per micro-step.",
                 dict(mesh.shape), f"{flops.param_count(model_config):,}", training.micro_batch,
                 sequence_length)
    if eval_every:
        eval_batch_size = eval_batch_size or training.micro_batch
        evaluator = sharded_step.shard_eval(training.model, mesh, rules, eval_batch_size,
                                            sequence_length)
        eval_streams = pipeline.validation_streams(
            vocabulary=stream.vocabulary, sequence_length=sequence_length,
            batch_size=eval_batch_size)

    checkpointer = checkpoints.TrainCheckpointer(model_dir / "checkpoints", model_config)
    base = load_lora_base(training, init_from)
    if base and jax.process_index() == 0:
        lora_lib.save_config(checkpointer.directory, workload.lora)
    state = restore_or_init(training, checkpointer, stream, seed, None if base else init_from)
    if jax.process_index() == 0:
        (model_dir / "config.gin").write_text(gin.config_str())

    logger = metrics.MetricsLogger(model_dir, total_steps=train_steps)
    sequence_flops = flops.flops_per_token(model_config, sequence_length,
                                           model_config.recompute) * sequence_length
    peak = flops.peak_flops(jax.devices()[0], model_config.dtype.name)
    step, consumed = int(state.step), int(state.consumed_samples)
    consecutive_skips = 0
    try:
        while step < train_steps:
            start = time.perf_counter()
            batch_size = workload.batch_ramp.batch_size_at(consumed)
            batch = shardings_lib.put_batch(
                stacked_batches(stream, training.micro_steps(batch_size)),
                training.batch_sharding)
            state, step_metrics = training.step(state, batch, batch_size, *base)
            step_metrics = jax.device_get(step_metrics)
            step_time = time.perf_counter() - start
            step, consumed = step + 1, consumed + batch_size

            consecutive_skips = consecutive_skips + 1 if step_metrics["skipped"] else 0
            if step % log_every == 0 or step in (1, train_steps) or step_metrics["skipped"]:
                step_flops = sequence_flops * batch_size
                logger.write_scalars(step, {
                    **{k: step_metrics[k] for k in ("loss", "learning_rate", "grad_norm")},
                    "batch_size": batch_size,
                    "tokens_seen": consumed * sequence_length,
                    "step_time_s": step_time,
                    "tokens_per_s": batch_size * sequence_length / step_time,
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
                params = (lora_lib.merge(*base, state.params, workload.lora) if base
                          else state.params)
                results = evaluation.evaluate(evaluator, params, eval_streams)
                logger.write_scalars(step, evaluation.eval_scalars(results))
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
