"""`python -m bloom_jax.plan`: will a configuration fit, and how fast will it run?

Compiles the real train step ahead of time on abstract arrays (`jax.ShapeDtypeStruct`; nothing is
allocated) on a mesh of N devices, which may be simulated CPU devices, and prints the parameter
count, the mesh and each parameter's sharding, per-device bytes (parameters, gradients, optimizer
state, XLA's temporaries) with `per_device_peak_bytes`, model FLOPs, and the step time and tokens/s
the configuration would reach at a given MFU on A100s and H100s.

    python -m bloom_jax.plan --gin_file=gin_configs/bloom176b.gin --num_devices=384
    python -m bloom_jax.plan --gin_file=gin_configs/bloom176b.gin --num_devices=384 --search

Exits 0 when the peak fits `--memory_gib`, 3 (naming the largest consumer) when it does not, and
2 when the mesh does not divide the model or the devices (with meshes that would).

Before a model is chosen, `--budget` (GPU-hours; or `--budget_flops`) says what a compute budget
buys by the scaling laws (scaling.py): the compute-optimal split, BLOOM shapes ranked by predicted
loss (budget.py), and for the best one the mesh, micro-batch and remat that fit, the days to
train, the checkpoints, and (`--write_gin`) the config with BLOOM's recipe scaled (recipe.py):

    python -m bloom_jax.plan --budget=1.08e6 --gpu=a100-80gb --num_devices=384 --write_gin=x.gin

`--fit RUN_DIR...` fits L(N, D) to finished runs (their final eval loss) and predicts a budget's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bloom_jax import (budget, checkpoints, configs, flops, metrics, recipe, runs, scaling,
                       sharded_step)
from bloom_jax.budget import short
from bloom_jax.data import pipeline
from bloom_jax.model import BloomConfig
from partitioning.mesh import MeshError, create_mesh, factorizations, format_shape
from partitioning.rules import Rules, logical_axis_rules

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The planner's own flags (configs.run adds the gin flags and --verbose)."""
    flags.DEFINE_integer("num_devices", None,
                         "Simulate this many CPU devices (default: the real ones).")
    flags.DEFINE_float("memory_gib", 80.0, "Memory of one device, GiB (A100-80GB and H100: 80; "
                       "--budget: default the --gpu's).")
    flags.DEFINE_float("mfu", 0.40, "Model FLOPs utilization to predict the step time at "
                       "(--search and --budget: that of a step recomputing every layer, as "
                       "BLOOM's; each remat policy's hardware FLOPs run at the same rate; "
                       "--budget and --fit: default BLOOM-176B's measured "
                       f"{budget.BLOOM_MFU:.1%}).")
    flags.DEFINE_bool("search", False, "Try the meshes, micro-batch sizes and remat policies "
                      "that divide and fit, and rank them by predicted step time.")
    flags.DEFINE_string("gpu", "A100", "GPU the search and --budget plan for, any case: one of "
                        f"{', '.join(budget.GPUS)}.")
    flags.DEFINE_integer("devices_per_host", 8, "GPUs per host: `tensor` stays inside one "
                         "(search).")
    flags.DEFINE_float("budget", None, "Compute budget in GPU-hours of --gpu at --mfu on "
                       "--num_devices GPUs: plan the model, tokens, mesh and days it buys.")
    flags.DEFINE_float("budget_flops", None, "The compute budget in model FLOPs (6ND-like, no "
                       "recomputation), instead of --budget.")
    flags.DEFINE_enum("law", scaling.DEFAULT_LAW, list(scaling.LAWS),
                      "Chinchilla constants that rank the shapes (see bloom_jax/scaling.py).")
    flags.DEFINE_string("write_gin", None, "--budget: write the chosen model's gin config here.")
    flags.DEFINE_bool("fit", False, "Fit L(N, D) to the runs (MODEL_DIRs) given as arguments.")
    flags.DEFINE_string("fit_task", "all", "--fit: the eval task whose loss is fitted "
                        "(eval/loss/<task>).")
    flags.DEFINE_integer("bootstrap", 100, "--fit: bootstrap resamples for the uncertainty.")


GIB = 2**30
EXIT_DOES_NOT_FIT = 3
EXIT_BAD_MESH = 2
GPUS = ("A100", "H100-SXM")  # keys of flops.PEAK_FLOPS the time table shows
# Bandwidth per GPU and direction, bytes/s: NVLink inside a host (tensor), InfiniBand across
# hosts (data, fsdp); A100: NVLink3 and 4 x 100 Gb/s HDR per 8 GPUs as on Jean Zay.
LINKS = {"A100": (300e9, 6.25e9), "H100-SXM": (450e9, 50e9), "H100-PCIe": (64e9, 25e9),
         "H200": (450e9, 50e9)}
SEARCH_MICRO_BATCH_SIZES = (1, 2)
SEARCH_REMAT_POLICIES = ("full", "dots_with_no_batch_dims")
# --budget: hidden sizes a multiple of 128 (tensor-core tiles; any power-of-two fsdp up to 128
# divides them), and BLOOM's training dropout.
HIDDEN_MULTIPLE = 128
TRAINING_DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compiled train step needs per device."""

    mesh: dict[str, int]
    micro_batch: int  # global sequences per micro-step
    micro_batches: int  # micro-steps per optimizer step
    shardings: list[tuple[str, tuple[int, ...], Any]]  # (parameter, shape, PartitionSpec)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    temp_bytes: int  # XLA's temporaries: activations, gathered weights, gradient buffers
    peak_bytes: int  # arguments + outputs - donated + temporaries
    compile_s: float


def _shard_bytes(tree: Any, shardings: Any, dtype: Any = None) -> int:
    """Bytes of one device's shards of `tree` (optionally as if stored in `dtype`)."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize,
        tree, shardings)
    return sum(jax.tree.leaves(sizes))


def plan_step(workload: sharded_step.Workload, mesh: jax.sharding.Mesh, rules: Rules) -> Plan:
    """Compiles the trainer's step for `mesh` on abstract arrays and measures it per device.

    Raises MeshError, before compiling, when the mesh does not divide the model or micro-batch.
    """
    training = sharded_step.shard_training(workload, mesh, rules)
    micro_batches = training.micro_steps(workload.batch_size)
    batch = {k: jax.ShapeDtypeStruct((micro_batches, training.micro_batch,
                                      workload.sequence_length), dtype,
                                     sharding=training.batch_sharding)
             for k, dtype in pipeline.BATCH_FEATURES.items()}
    start = time.perf_counter()
    compiled = training.step.lower(training.abstract_state, batch,
                                   jax.ShapeDtypeStruct((), jnp.int32),
                                   *training.abstract_args).compile()
    compile_s = time.perf_counter() - start

    memory = compiled.fn.memory_analysis()
    state, shardings = training.abstract_state, training.state_shardings
    params, param_shardings = state.params, shardings.params
    return Plan(
        mesh=dict(mesh.shape),
        micro_batch=training.micro_batch,
        micro_batches=micro_batches,
        shardings=[(jax.tree_util.keystr(path, simple=True, separator="/"), x.shape, s.spec)
                   for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params),
                                           jax.tree.leaves(param_shardings))],
        # With LoRA, the frozen base too (trained: the adapters; gradients and state: theirs).
        param_bytes=_shard_bytes(params, param_shardings) + sum(
            _shard_bytes(base, training.base_shardings) for base in training.abstract_args),
        grad_bytes=_shard_bytes(params, param_shardings, jnp.float32),  # float32 accumulators
        optimizer_bytes=_shard_bytes(state.opt_state, shardings.opt_state),
        temp_bytes=memory.temp_size_in_bytes,
        peak_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        compile_s=compile_s,
    )


def format_plan(plan: Plan, workload: sharded_step.Workload, mfu: float) -> str:
    """The report: counts, mesh, shardings, memory, FLOPs and predicted speed."""
    config, batch_size, seq_len = (workload.model_config, workload.batch_size,
                                   workload.sequence_length)
    num_devices = math.prod(plan.mesh.values())
    model_flops = flops.flops_per_step(config, batch_size, seq_len)
    hardware = flops.flops_per_token(config, seq_len, config.remat_policy, plan.mesh["stage"])
    per_pass = workload.pipeline_micro_steps or plan.micro_batches
    lines = [
        f"parameters: {flops.param_count(config)}",
        f"mesh: {format_shape(plan.mesh)} ({num_devices} devices)",
        f"batch: {batch_size} sequences x {seq_len} tokens = {plan.micro_batches} micro-steps "
        f"of {plan.micro_batch} sequences (remat: {config.remat_policy})",
        *([f"pipeline: {plan.mesh['stage']} stages, passes of {per_pass} micro-steps, bubble "
           f"{flops.pipeline_bubble(plan.mesh['stage'], per_pass):.1%} (GPipe); "
           f"{short(flops.stage_transfer_bytes(config, plan.micro_batch, seq_len, plan.mesh))}B "
           "per device to the next stage per micro-step"]
          if plan.mesh["stage"] > 1 else []),
        "sharding (parameter: shape -> mesh axes):",
        *(f"  {name}: {shape} -> {spec}" for name, shape, spec in plan.shardings),
        "per-device memory:",
        f"  parameters:      {plan.param_bytes / GIB:9.2f} GiB",
        f"  gradients:       {plan.grad_bytes / GIB:9.2f} GiB (float32 accumulators, "
        "in XLA temp)",
        f"  optimizer state: {plan.optimizer_bytes / GIB:9.2f} GiB",
        f"  XLA temporaries: {plan.temp_bytes / GIB:9.2f} GiB (activations, gathered weights, "
        "gradients)",
        f"per_device_peak_bytes: {plan.peak_bytes}",
        f"model FLOPs per step: {model_flops:.4g} (per token: "
        f"{flops.flops_per_token(config, seq_len):.4g}; hardware, with remat "
        f"{config.remat_policy}'s recomputation: {hardware:.4g})",
        f"predicted at {mfu:.0%} MFU (bfloat16 dense peak):",
    ]
    for gpu in GPUS:
        step_s = model_flops / (num_devices * flops.PEAK_FLOPS[gpu]["bfloat16"] * mfu)
        lines.append(f"  {gpu:9s} {step_s:9.2f} s/step  {batch_size * seq_len / step_s:12,.0f} "
                     f"tokens/s")
    lines.append(f"compiled in {plan.compile_s:.1f} s")
    return "\n".join(lines)


def hardware_rate(config: BloomConfig, seq_len: int, mfu: float) -> float:
    """The share of peak at which a device runs hardware FLOPs when a step that recomputes every
    layer (as BLOOM's did) reaches `mfu` in model FLOPs: BLOOM-176B's 35.8% is 47.6%."""
    return mfu * flops.flops_per_token(config, seq_len, "full") / flops.flops_per_token(
        config, seq_len)


def predicted_step_s(plan: Plan, config: BloomConfig, seq_len: int, gpu: str, mfu: float,
                     devices_per_host: int) -> float:
    """Compute plus the collectives of FSDP and tensor parallelism at LINKS bandwidth.

    Compute is the hardware FLOPs (the remat policy's recomputation and padded rows count) at
    `hardware_rate` of the bfloat16 peak: `mfu` is what a fully recomputing step would reach.

    Per micro-step, FSDP all-gathers each layer's bfloat16 weights (forward, backward and, with
    full recomputation, again) and reduce-scatters float32 gradients; tensor parallelism
    all-reduces 2 activations per layer forward and 2 backward.
    """
    mesh, devices = plan.mesh, math.prod(plan.mesh.values())
    rows = plan.micro_batches * plan.micro_batch
    compute_s = (flops.flops_per_step(config, rows, seq_len, config.remat_policy)
                 / (devices * flops.PEAK_FLOPS[gpu]["bfloat16"]
                    * hardware_rate(config, seq_len, mfu)))
    nvlink, network = LINKS[gpu]
    params = flops.param_count(config) / mesh["tensor"]
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731  (fraction a ring moves)
    gathers = 3 if config.remat_policy == "full" else 2
    fsdp_bytes = params * (2 * gathers + 4) * ring(mesh["fsdp"]) * plan.micro_batches
    activation = plan.micro_batch / (mesh["data"] * mesh["fsdp"]) * seq_len * config.hidden_size
    tensor_bytes = (4 * activation * 2 * 2 * config.n_layer * ring(mesh["tensor"])
                    * plan.micro_batches)
    fsdp_link = nvlink if mesh["fsdp"] * mesh["tensor"] <= devices_per_host else network
    grads_allreduce = 2 * 4 * params / mesh["fsdp"] * ring(mesh["data"])
    return compute_s + fsdp_bytes / fsdp_link + tensor_bytes / nvlink + grads_allreduce / network


def search_space(workload: sharded_step.Workload, num_devices: int, memory: int,
                 devices_per_host: int) -> Iterator[tuple[dict[str, int], sharded_step.Workload]]:
    """The (mesh shape, workload with a micro-batch size and remat policy) the search tries:
    `tensor` inside one host, and only meshes over which the float32 state alone can fit."""
    state_bytes = 16 * flops.param_count(workload.model_config)  # params, grads, Adam's mu, nu
    for shape in factorizations(num_devices):
        if shape["tensor"] > devices_per_host or (
                state_bytes / (shape["fsdp"] * shape["tensor"]) > memory):
            continue
        for micro_batch_size in SEARCH_MICRO_BATCH_SIZES:
            for remat in SEARCH_REMAT_POLICIES:
                yield shape, dataclasses.replace(
                    workload, micro_batch_size=micro_batch_size,
                    model_config=dataclasses.replace(workload.model_config, remat_policy=remat))


def _try(candidate: sharded_step.Workload, shape: dict[str, int], rules: Rules) -> Plan | None:
    """The compiled plan of one point of the search space; None when the mesh does not divide."""
    mesh = create_mesh(**shape, devices=jax.devices()[:math.prod(shape.values())])
    try:
        result = plan_step(candidate, mesh, rules)
    except MeshError:
        return None
    print(f"  tried {format_shape(shape)}, micro_batch_size={candidate.micro_batch_size}, "
          f"remat={candidate.model_config.remat_policy}: {result.peak_bytes / GIB:.1f} GiB",
          flush=True)
    return result


def search(workload: sharded_step.Workload, num_devices: int, rules: Rules, memory: int,
           mfu: float, gpu: str, devices_per_host: int,
           ) -> list[tuple[float, Plan, sharded_step.Workload]]:
    """Every (mesh, micro-batch size, remat) whose mesh divides and whose step fits `memory`,
    fastest first (predicted on `gpu` at `mfu`)."""
    results = []
    for shape, candidate in search_space(workload, num_devices, memory, devices_per_host):
        result = _try(candidate, shape, rules)
        if result is not None and result.peak_bytes <= memory:
            step_s = predicted_step_s(result, candidate.model_config, workload.sequence_length,
                                      gpu, mfu, devices_per_host)
            results.append((step_s, result, candidate))
    return sorted(results, key=lambda r: r[0])


def fastest_fit(workload: sharded_step.Workload, num_devices: int, rules: Rules, memory: int,
                mfu: float, gpu: str, devices_per_host: int,
                ) -> tuple[float, Plan, sharded_step.Workload] | None:
    """What `search` would rank first, in a few compiles: the search space in order of
    predicted step time (which depends only on the mesh and micro-batches), compiled until one
    fits. None when nothing fits."""
    def predicted(point: tuple[dict[str, int], sharded_step.Workload]) -> float:
        shape, candidate = point
        micro_batch = candidate.micro_batch_size * shape["data"] * shape["fsdp"]
        layout = Plan(mesh=shape, micro_batch=micro_batch,
                      micro_batches=sharded_step.micro_steps(candidate.batch_size, micro_batch),
                      shardings=[], param_bytes=0, grad_bytes=0, optimizer_bytes=0,
                      temp_bytes=0, peak_bytes=0, compile_s=0.0)
        return predicted_step_s(layout, candidate.model_config, candidate.sequence_length, gpu,
                                mfu, devices_per_host)

    for point in sorted(search_space(workload, num_devices, memory, devices_per_host),
                        key=predicted):
        result = _try(point[1], point[0], rules)
        if result is not None and result.peak_bytes <= memory:
            return predicted(point), result, point[1]
    return None


def largest_consumer(plan: Plan) -> str:
    parts = {"parameters": plan.param_bytes, "optimizer state": plan.optimizer_bytes,
             "XLA temporaries (activations, gathered weights, gradients)": plan.temp_bytes}
    name = max(parts, key=parts.get)
    return f"{name}: {parts[name] / GIB:.1f} GiB"


def _simulate_devices(num_devices: int) -> None:
    """N CPU devices, compiling fast: the program is measured, never run."""
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true"])
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)


def _budget_flops() -> float | None:
    """The budget of --budget_flops or --budget, or None when neither is given."""
    if FLAGS.budget is not None and FLAGS.budget_flops is not None:
        raise app.UsageError("Give --budget (GPU-hours) or --budget_flops, not both.")
    if FLAGS.budget_flops is not None:
        if FLAGS.budget_flops <= 0:
            raise ValueError(f"--budget_flops must be > 0; got {FLAGS.budget_flops}.")
        return FLAGS.budget_flops
    if FLAGS.budget is None:
        return None
    mfu = FLAGS.mfu if FLAGS["mfu"].present else budget.BLOOM_MFU
    return budget.budget_flops(FLAGS.budget, budget.gpu(FLAGS.gpu), mfu)


def plan_budget(flops_budget: float) -> None:
    """--budget: the laws' split, the ranked shapes, and the best one's mesh, days, checkpoints
    and (--write_gin) config."""
    device, num_devices = budget.gpu(FLAGS.gpu), jax.device_count()
    mfu = FLAGS.mfu if FLAGS["mfu"].present else budget.BLOOM_MFU
    memory_gib = FLAGS.memory_gib if FLAGS["memory_gib"].present else device.memory_gib
    seq_len, law = budget.BLOOM_SEQUENCE_LENGTH, scaling.LAWS[FLAGS.law]
    where = (f"{FLAGS.budget:.4g} GPU-hours of {device.name} ({memory_gib:g} GiB) at {mfu:.1%} "
             "MFU = " if FLAGS.budget is not None else "")
    print(f"budget: {where}{flops_budget:.4g} model FLOPs on {num_devices} GPUs")
    print(budget.format_laws(flops_budget))
    candidates = budget.rank_shapes(flops_budget, law, seq_len,
                                    heads_multiple=math.gcd(FLAGS.devices_per_host, num_devices),
                                    hidden_multiple=HIDDEN_MULTIPLE)
    print(budget.format_candidates(candidates, law))

    best = candidates[0]
    shape = best.shape
    plan_recipe = recipe.bloom_recipe(best.params, best.tokens, seq_len)
    configs.parse([configs.BASE_CONFIG], [
        f"BloomConfig.n_layer = {shape.n_layer}", f"BloomConfig.hidden_size = {shape.hidden_size}",
        f"BloomConfig.n_head = {shape.n_head}",
        f"BloomConfig.hidden_dropout = {TRAINING_DROPOUT}",
        f"BloomConfig.attention_dropout = {TRAINING_DROPOUT}",
        f"BATCH_SIZE = {plan_recipe.batch_size}", f"SEQUENCE_LENGTH = {seq_len}"],
        skip_unknown=configs.LOOP_CONFIGURABLES)
    print(f"planning {shape.n_layer} x {shape.hidden_size} ({shape.n_head} heads), batch "
          f"{plan_recipe.batch_size} x {seq_len}, on {num_devices} devices:")
    found = fastest_fit(sharded_step.Workload(), num_devices, logical_axis_rules(),
                        int(memory_gib * GIB), mfu, device.name, FLAGS.devices_per_host)
    if found is None:
        print(f"does not fit: no mesh, micro-batch size and remat policy fits {memory_gib:g} GiB "
              "per device; add devices or pick a smaller shape.", file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)
    step_s, result, workload = found
    config, micro_batch_size = workload.model_config, workload.micro_batch_size
    tokens_per_s = plan_recipe.batch_size * seq_len / step_s
    train_s = plan_recipe.tokens / tokens_per_s
    compute_s = flops_budget / (num_devices * flops.PEAK_FLOPS[device.name]["bfloat16"] * mfu)
    every = min(recipe.checkpoint_every(step_s), plan_recipe.train_steps)
    saves = -(-plan_recipe.train_steps // every)
    checkpoint_bytes = recipe.checkpoint_bytes(config)
    keep = checkpoints.CheckpointOptions().keep
    print("\n".join([
        f"chosen: {config.n_layer} layers, hidden {config.hidden_size}, {config.n_head} heads: "
        f"{best.params:,} parameters on {short(best.tokens)} tokens, predicted loss "
        f"{best.loss:.3f} ({law.name}; BLOOM-176B on {short(budget.BLOOM_176B_TOKENS)} tokens: "
        f"{law.loss(flops.param_count(budget.BLOOM_176B), budget.BLOOM_176B_TOKENS):.3f})",
        f"  mesh {format_shape(result.mesh)}, micro_batch_size={micro_batch_size}, "
        f"remat={config.remat_policy}: {result.peak_bytes / GIB:.1f} of {memory_gib:g} GiB",
        f"  {plan_recipe.train_steps:,} steps; predicted {step_s:.2f} s/step at full batch "
        f"({hardware_rate(config, seq_len, mfu):.1%} of peak in hardware FLOPs, plus "
        "collectives), "
        f"{tokens_per_s:,.0f} tokens/s",
        f"  {metrics.format_duration(train_s)} to train by the planner = "
        f"{train_s / 3600 * num_devices:,.0f} GPU-hours"
        + (f" ({train_s / 3600 * num_devices / FLAGS.budget:.0%} of the budget)"
           if FLAGS.budget is not None else "")
        + f"; {metrics.format_duration(compute_s)} at {mfu:.1%} MFU with no time lost to "
        "collectives",
        f"  checkpoints: {saves:,} saves, every {every:,} steps ({every * step_s / 3600:.1f} h), "
        f"{checkpoint_bytes / GIB:,.1f} GiB each (float32 parameters and Adam moments); the "
        f"last {keep} kept: {keep * checkpoint_bytes / GIB:,.1f} GiB on disk",
        f"  recipe: batch ramp {plan_recipe.ramp.start} -> {plan_recipe.batch_size} "
        f"(+{plan_recipe.ramp.increment}) over {plan_recipe.ramp.rampup_samples:,} samples, "
        f"warmup {short(plan_recipe.warmup_tokens)} tokens, cosine decay to "
        f"{short(plan_recipe.decay_tokens)} tokens, lr {plan_recipe.peak_lr:.3g} -> "
        f"{plan_recipe.min_lr:.3g}",
    ]))
    if FLAGS.write_gin:
        header = (f"BLOOM-style {config.n_layer} x {config.hidden_size} for {flops_budget:.4g} "
                  f"model FLOPs on {num_devices} x {device.name}, written by\n"
                  f"python -m bloom_jax.plan {' '.join(sys.argv[1:])}")
        pathlib.Path(FLAGS.write_gin).write_text(recipe.gin_config(
            config, plan_recipe, result.mesh, micro_batch_size, every, header))
        print(f"wrote {FLAGS.write_gin}")


def fit_runs(run_dirs: Sequence[str], flops_budget: float | None) -> None:
    """--fit: the law of the runs, its bootstrap uncertainty, and its prediction at the budget
    (default: BLOOM-176B's compute)."""
    if not run_dirs:
        raise app.UsageError("--fit needs the runs' MODEL_DIRs as arguments.")
    found = [runs.read_run(run_dir, FLAGS.fit_task) for run_dir in run_dirs]
    print(f"{len(found)} runs (final eval/loss/{FLAGS.fit_task}):")
    for run in found:
        print(f"  {run.model_dir}: {run.params:,} parameters, {short(run.tokens)} tokens, "
              f"loss {run.loss:.4f} at step {run.step}")
    data = [np.array([getattr(run, field) for run in found], np.float64)
            for field in ("params", "tokens", "loss")]
    law = scaling.fit(*data)
    resampled = scaling.bootstrap(*data, resamples=FLAGS.bootstrap)
    if flops_budget is None:
        flops_budget = 6 * budget.BLOOM_176B_TOKENS * flops.param_count(budget.BLOOM_176B)
        print(f"(no --budget: predicting at BLOOM-176B's compute, 6ND = {flops_budget:.3g})")

    def interval(values: list[float]) -> str:
        low, high = np.percentile(values, [5, 95])
        return f"[{low:.4g}, {high:.4g}]"

    predictions = [(*fitted.optimum(flops_budget),) for fitted in resampled]
    params, tokens = law.optimum(flops_budget)
    print("\n".join([
        f"L(N, D) = E + A / N^alpha + B / D^beta, Huber fit on log-loss; 90% bootstrap "
        f"intervals over {len(resampled)} resamples of the runs:",
        *(f"  {name:5s} = {getattr(law, name):.4g}  "
          f"{interval([getattr(fitted, name) for fitted in resampled])}"
          for name in ("E", "A", "B", "alpha", "beta")),
        f"at {flops_budget:.4g} FLOPs: {short(params)} parameters "
        f"{interval([p for p, _ in predictions])}, {short(tokens)} tokens "
        f"{interval([d for _, d in predictions])}, loss {law.loss(params, tokens):.4f} "
        f"{interval([fitted.loss(*p) for fitted, p in zip(resampled, predictions)])}",
    ]))


def main(argv: Sequence[str]) -> None:
    flops_budget = _budget_flops()
    if FLAGS.fit:
        fit_runs(argv[1:], flops_budget)
        return
    configs.no_arguments(argv)
    if FLAGS.num_devices:
        _simulate_devices(FLAGS.num_devices)
    if flops_budget is not None:
        plan_budget(flops_budget)
        return
    configs.parse_flags(skip_unknown=configs.LOOP_CONFIGURABLES)
    workload = sharded_step.Workload()
    memory = int(FLAGS.memory_gib * GIB)
    if FLAGS.search:
        ranked = search(workload, jax.device_count(), logical_axis_rules(), memory, FLAGS.mfu,
                        budget.gpu(FLAGS.gpu).name, FLAGS.devices_per_host)
        print(f"{len(ranked)} configurations fit {FLAGS.memory_gib} GiB; fastest first "
              f"(predicted on {FLAGS.gpu} at {FLAGS.mfu:.0%} MFU with full recomputation):")
        for step_s, result, candidate in ranked:
            print(f"  {step_s:8.1f} s/step  {format_shape(result.mesh)}  micro_batch_size="
                  f"{candidate.micro_batch_size}  remat={candidate.model_config.remat_policy}  "
                  f"peak={result.peak_bytes / GIB:.1f} GiB")
        sys.exit(0 if ranked else EXIT_DOES_NOT_FIT)
    plan = plan_step(workload, create_mesh(), logical_axis_rules())
    print(format_plan(plan, workload, FLAGS.mfu))
    if plan.peak_bytes > memory:
        print(f"does not fit: {plan.peak_bytes / GIB:.1f} GiB per device > {FLAGS.memory_gib} GiB; "
              f"largest consumer: {largest_consumer(plan)}", file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)
    print(f"fits: {plan.peak_bytes / GIB:.1f} GiB of {FLAGS.memory_gib} GiB per device")


if __name__ == "__main__":
    define_flags()
    configs.run(main, exit_codes={MeshError: EXIT_BAD_MESH})
