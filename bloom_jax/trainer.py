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
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gin
import jax
import numpy as np
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from bloom_jax import checkpoints, configs, distributed, evaluation, flops, metric_logger, metrics
from bloom_jax import lora as lora_lib
from bloom_jax import optim, param_store, prefetch, sharded_step
from bloom_jax import step as step_lib
from bloom_jax.data import instructions, pipeline, vocabularies
from bloom_jax.model import padded_layers
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
    prefetch_depth: int = 2,
    profile_steps: tuple[int, int] | None = None,
    compilation_cache_dir: str | None = None,
    make_stream: Callable[..., Iterator[dict]] = pipeline.make_stream,
    make_validation_streams: Callable[..., dict] = pipeline.validation_streams,
) -> step_lib.TrainState:
    """Trains until `train_steps` optimizer steps (restored ones included); returns the state.

    workload: the model, batch (and its ramp), sequence length and micro-batch of each step.
    init_from: a checkpoint directory (e.g. from `bloom_jax.convert from_hf`) whose parameters a
      fresh run starts from; ignored when MODEL_DIR already has a checkpoint to resume.
    eval_every: every N steps and at the end, log `eval/{loss,perplexity,bits_per_byte}/<task>`
      on each task's validation split (and "all", blended); 0: no evaluation.
    eval_batch_size: global sequences per eval forward pass; None: the micro-step's.
    prefetch_depth: global batches built and put on the devices ahead of the running step.
    profile_steps: (START, COUNT): a profiler trace of COUNT steps from step START.
    compilation_cache_dir: jax's persistent compilation cache, so a resumed run does not
      recompile; None: $JAX_COMPILATION_CACHE_DIR when set, else MODEL_DIR/compilation_cache.
    make_stream: the training data, (batch_size=, sequence_length=) -> a stream with
      `vocabulary`, `get_state` and `set_state`: the ROOTS mixture (pretraining) or
      `make_instruction_stream` (instruction fine-tuning, gin_configs/sft.gin).
    make_validation_streams: what eval_every evaluates, (vocabulary=, sequence_length=,
      batch_size=) -> {name: batches}: every language's validation split, or the held-out
      instructions' targets and prompts (`instruction_validation_streams`, sft.gin).
    Gin: `train.eval_every = 1000`, `train.eval_batch_size = 64`, `train.profile_steps = (10, 5)`
    (`--gin.train.profile_steps=10,5`).
    """
    if model_dir is None:
        raise ValueError("MODEL_DIR is not set: pass --gin.MODEL_DIR=/path/to/run (checkpoints, "
                         "TensorBoard events and the operative config are written there).")
    configs.check_int("TRAIN_STEPS", train_steps, "1000")
    model_dir = pathlib.Path(model_dir).absolute()
    if model_dir.exists() and not model_dir.is_dir():
        raise ValueError(f"MODEL_DIR {model_dir} is a file, not a folder; choose another "
                         "MODEL_DIR.")
    skip_policy = skip_policy or step_lib.SkipPolicy()
    profile = Profile(model_dir, profile_steps)
    distributed.initialize()

    # Everything the config names is built and checked before MODEL_DIR is written to.
    model_config, sequence_length = workload.model_config, workload.sequence_length
    mesh = mesh_lib.create_mesh()
    rules = rules_lib.logical_axis_rules()
    training = sharded_step.shard_training(workload, mesh, rules, skip_policy)
    if init_from and not (model_dir / "checkpoints").exists():  # a fresh run starts from it
        param_store.checkpoint_config(param_store.checkpoint_dir(init_from), model_config,
                                      fix="set INIT_FROM to a checkpoint of this model size")
    stream = make_stream(batch_size=training.micro_batch, sequence_length=sequence_length)
    vocabularies.check_fits_model(stream.vocabulary, model_config.vocab_size)
    logging.info("Mesh %s; %s parameters; %d sequences of %d tokens per micro-step.",
                 mesh_lib.shown(dict(mesh.shape)), f"{flops.param_count(model_config):,}",
                 training.micro_batch, sequence_length)
    if (stages := mesh.shape["stage"]) > 1:
        per_pass, repeats = training.pipeline_pass(workload.batch_size), training.model.repeats
        logging.info("Pipeline: %d stages x %d layers in %d round(s), passes of %d micro-steps: "
                     "bubble %.1f%%; %sB per device to the next stage per iteration.", stages,
                     padded_layers(model_config.n_layer, stages * repeats) // stages, repeats,
                     per_pass, 100 * flops.pipeline_bubble(stages, per_pass, repeats),
                     metrics.human(flops.stage_transfer_bytes(
                         model_config, training.micro_batch, sequence_length, mesh.shape,
                         rules_lib.sequence_parallel(rules))))
    if eval_every:
        eval_batch_size = eval_batch_size or training.micro_batch
        evaluator = sharded_step.shard_eval(training.model, mesh, rules, eval_batch_size,
                                            sequence_length)
        eval_streams = make_validation_streams(
            vocabulary=stream.vocabulary, sequence_length=sequence_length,
            batch_size=eval_batch_size)
    base = load_lora_base(training, init_from)

    checkpointer = checkpoints.TrainCheckpointer(model_dir / "checkpoints", model_config)
    lora_lib.check_resumable(checkpointer.directory, workload.lora,
                             checkpointer.latest_step() is not None)
    state = restore_or_init(training, checkpointer, stream, seed, None if base else init_from)
    checkpointer.claim()  # the start-up is valid: from here on the run writes to MODEL_DIR
    if base and jax.process_index() == 0:
        lora_lib.save_config(checkpointer.directory, workload.lora)
    operative_config = gin.config_str()
    if jax.process_index() == 0:
        (model_dir / "config.gin").write_text(operative_config)
    use_compilation_cache(compilation_cache_dir or (
        None if jax.config.jax_compilation_cache_dir else model_dir / "compilation_cache"))

    logger = metric_logger.MetricsLogger(model_dir, total_steps=train_steps)
    logger.write_text(0, "gin/operative_config", operative_config)
    # Per sequence: model FLOPs (MFU), and the FLOPs computed again as well (HFU).
    sequence_flops = flops.flops_per_step(model_config, 1, sequence_length)
    sequence_hardware_flops = flops.hardware_flops_per_step(model_config, 1, sequence_length)
    peak = flops.peak_flops(jax.devices()[0], model_config.dtype.name)
    step, consumed = int(state.step), int(state.consumed_samples)
    times = metrics.TimeBreakdown()
    consecutive_skips, skipped = 0, int(state.skipped_steps)
    last_report = time.perf_counter()

    def report(done: LaunchedStep) -> None:
        """Fetches a launched step's metrics (blocking until it ran) and logs them when due."""
        nonlocal consecutive_skips, last_report, skipped
        with times.measure("step"):
            step_metrics = jax.device_get(done.metrics)
        now = time.perf_counter()
        step_time, last_report = now - last_report, now
        consecutive_skips = consecutive_skips + 1 if step_metrics["skipped"] else 0
        skipped += int(step_metrics["skipped"])
        if (done.step % log_every == 0 or done.step in (1, train_steps)
                or step_metrics["skipped"]):
            step_flops = sequence_flops * done.batch_size
            logger.write_scalars(done.step, {
                **{k: step_metrics[k] for k in ("loss", "learning_rate", "grad_norm")},
                "batch_size": done.batch_size,
                "tokens_seen": done.consumed * sequence_length,
                "step_time_s": step_time,
                "tokens_per_s": done.batch_size * sequence_length / step_time,
                "tflops_per_device": flops.tflops_per_device(
                    step_flops, step_time, jax.device_count()),
                "mfu": flops.mfu(step_flops, step_time, jax.device_count(), peak),
                "hfu": flops.mfu(sequence_hardware_flops * done.batch_size, step_time,
                                 jax.device_count(), peak),
                "skipped_steps": skipped,
                **metrics.memory_scalars(),
                **times.scalars(),
            })
        if consecutive_skips > skip_policy.max_consecutive:
            raise TrainingError(
                f"{consecutive_skips} steps in a row were skipped (a non-finite loss, "
                f"gradient or update, or a spiking loss), the last at step {done.step}. Skipped "
                "updates are never applied, so the checkpoints hold finite parameters: restart "
                "from the last one with a lower learning rate, or a data seed that skips the "
                "offending batches.")

    batches = prefetch.Prefetcher(prepared_batches(training, workload.batch_ramp, stream,
                                                   consumed), depth=prefetch_depth)
    compiles = _CompileLog(times)
    pending = None  # the launched step whose metrics are fetched after the next one launches
    try:
        while step < train_steps:
            profile.before(step + 1)
            with times.measure("data"):
                prepared = next(batches)
            with times.measure("step"):
                state, step_metrics = training.step(state, prepared.batch, prepared.batch_size,
                                                   *base)
            step, consumed = step + 1, consumed + prepared.batch_size
            if pending is not None:
                report(pending)
            pending = LaunchedStep(step, prepared.batch_size, consumed, step_metrics)
            profile.after(step, state)

            evaluating = eval_every and (step % eval_every == 0 or step == train_steps)
            preempted = distributed.reached_preemption(step)
            last = preempted or step == train_steps
            if evaluating or last:  # the host waits for this step anyway
                report(pending)
                pending = None
            if evaluating:
                params = (lora_lib.merge(*base, state.params, workload.lora) if base
                          else state.params)
                with times.measure("eval"):
                    results = evaluation.evaluate(evaluator, params, eval_streams)
                logger.write_scalars(step, evaluation.eval_scalars(results))
            logger.progress(step, suffix=format_breakdown(times.scalars()))
            checkpointer.check()  # a failed background save stops the run now, naming its step
            if last or checkpointer.should_save(step):
                with times.measure("checkpoint"):
                    checkpointer.save(state, prepared.data_state, force=last)
            if preempted:
                logging.warning("Preempted: checkpoint of step %d saved; exiting.", step)
                break
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        raise distributed.PeerFailed(  # e.g. gloo's "Connection closed by peer"
            f"a step failed in a collective with the other processes "
            f"({str(error).splitlines()[0]}): one of them probably died, see its log; relaunch "
            "the run to resume from its last checkpoint") from error
    finally:
        batches.close()
        compiles.close()
        profile.close()
        checkpointer.close()
        logger.close()
    return state


def use_compilation_cache(directory: str | pathlib.Path | None) -> None:
    """Keeps compiled programs in `directory` from now on (None: leaves the cache as it is)."""
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        compilation_cache.reset_cache()  # a cache already opened (or found unset) is reopened


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """A global batch on the devices, with its size and the data position after it."""

    batch_size: int
    batch: dict[str, jax.Array]  # [micro_steps, micro_batch, length] per feature
    data_state: dict


def prepared_batches(training: sharded_step.ShardedTraining, ramp: optim.BatchRampUp,
                     stream: pipeline.PackedStream, consumed: int) -> Iterator[PreparedBatch]:
    """The run's global batches from `consumed` samples on, along the batch ramp: stacked into
    micro-steps, padded to the compiled step's shape, put on the devices, each with the stream's
    position after it."""
    while True:
        batch_size = ramp.batch_size_at(consumed)
        host = training.padded(stacked_batches(stream, training.micro_steps(batch_size)))
        yield PreparedBatch(batch_size, shardings_lib.put_batch(host, training.batch_sharding),
                            stream.get_state())
        consumed += batch_size


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    """A step dispatched to the devices, its metrics not yet fetched."""

    step: int
    batch_size: int
    consumed: int  # samples consumed after it
    metrics: dict[str, jax.Array]


def format_breakdown(scalars: dict[str, float]) -> str:
    """`goodput 91% (compile 3%, data 1%, ...)` from TimeBreakdown.scalars()."""
    parts = ", ".join(f"{name} {100 * scalars[f'time/{name}']:.0f}%"
                      for name in (*metrics.TimeBreakdown.PARTS, "other") if name != "step")
    return f"goodput {100 * scalars['goodput']:.0f}% ({parts})"


class _CompileLog:
    """Logs each XLA compile, or load from the persistent compilation cache, with its time, and
    counts it as compile time."""

    EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
    CACHE_HIT = "/jax/compilation_cache/cache_hits"  # recorded inside that event's span

    def __init__(self, times: metrics.TimeBreakdown):
        self._times = times
        self._hit = threading.local()  # a compile and its cache hit happen on one thread
        jax.monitoring.register_event_listener(self._record_hit)
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record_hit(self, event: str, **kwargs) -> None:
        del kwargs
        if event == self.CACHE_HIT:
            self._hit.value = True

    def _record(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            hit, self._hit.value = getattr(self._hit, "value", False), False
            logging.info("Loaded %s from the compilation cache in %.2f s." if hit else
                         "Compiled %s in %.2f s.", kwargs.get("fun_name", "a program"), duration)
            self._times.add("compile", duration)

    def close(self) -> None:
        jax.monitoring.unregister_event_listener(self._record_hit)
        jax.monitoring.unregister_event_duration_listener(self._record)


class Profile:
    """A profiler trace of steps START..START+COUNT-1 (`train.profile_steps = (START, COUNT)`),
    written under MODEL_DIR/plugins/profile/ for TensorBoard's profile plugin, with a Perfetto
    trace beside it."""

    def __init__(self, model_dir: pathlib.Path, steps: tuple[int, int] | None):
        if steps is not None and (len(steps) != 2 or steps[0] < 1 or steps[1] < 1):
            raise ValueError(f"train.profile_steps={steps!r} is not START,COUNT with both >= 1; "
                             "e.g. --gin.train.profile_steps=10,5.")
        self._model_dir, self._steps, self._active = model_dir, steps, False

    def before(self, step: int) -> None:
        if self._steps is not None and step == self._steps[0]:
            jax.profiler.start_trace(str(self._model_dir), create_perfetto_trace=True)
            self._active = True

    def after(self, step: int, state: Any) -> None:
        if self._active and step == sum(self._steps) - 1:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            logging.info("Profile of steps %d..%d written under %s.", self._steps[0],
                         sum(self._steps) - 1, self._model_dir / "plugins" / "profile")
