"""What a compute budget buys, and the law of finished runs: the planner's `--budget` and `--fit`
reports (plan.py parses the flags).

`plan_budget` prints the laws' compute-optimal split, BLOOM shapes ranked by predicted loss
(budget.py), and for the best one the fastest layout that fits (layouts.py), the days to train,
the checkpoints and (optionally) the config with BLOOM's recipe scaled (recipe.py). `fit_runs`
fits L(N, D) to finished runs and predicts a budget's.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from bloom_jax import (budget, checkpoints, configs, flops, layouts, metrics, recipe, runs,
                       scaling, sharded_step)
from bloom_jax.budget import short
from partitioning.mesh import format_shape

EXIT_DOES_NOT_FIT = 3
# Hidden sizes a multiple of 128 (tensor-core tiles; any power-of-two fsdp up to 128 divides
# them), and BLOOM's training dropout.
HIDDEN_MULTIPLE = 128
TRAINING_DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class BudgetRequest:
    """What `plan --budget` was asked: the budget, the hardware and the law."""

    flops: float
    gpu_hours: float | None  # None: given in FLOPs
    gpu: budget.Gpu
    num_devices: int
    mfu: float
    memory_gib: float
    law: str
    devices_per_node: int
    links: tuple[float, float]


def plan_budget(request: BudgetRequest, write_gin: str | None, command: str) -> None:
    """--budget: the laws' split, the ranked shapes, and the best one's mesh, days, checkpoints
    and (`write_gin`) config; `command` is the planner's command line, for the config's header."""
    device, num_devices, flops_budget = request.gpu, request.num_devices, request.flops
    mfu, memory_gib = request.mfu, request.memory_gib
    seq_len, law = budget.BLOOM_SEQUENCE_LENGTH, scaling.LAWS[request.law]
    where = (f"{request.gpu_hours:.4g} GPU-hours of {device.name} ({memory_gib:g} GiB) at "
             f"{mfu:.1%} MFU = " if request.gpu_hours is not None else "")
    print(f"budget: {where}{flops_budget:.4g} model FLOPs on {num_devices} GPUs")
    print(budget.format_laws(flops_budget))
    candidates = budget.rank_shapes(flops_budget, law, seq_len,
                                    heads_multiple=math.gcd(request.devices_per_node, num_devices),
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
        skip_unknown=configs.OUTSIDE_THE_STEP)
    print(f"planning {shape.n_layer} x {shape.hidden_size} ({shape.n_head} heads), batch "
          f"{plan_recipe.batch_size} x {seq_len}, on {num_devices} devices:")
    workload = sharded_step.Workload()
    fits, _ = layouts.search(
        workload, num_devices, int(memory_gib * layouts.GIB), device.name,
        layouts.hardware_rate(workload.model_config, seq_len, mfu), request.links,
        request.devices_per_node, seconds=math.inf, first=True)
    if not fits:
        print(f"does not fit: no mesh, micro-batch size and remat policy fits {memory_gib:g} GiB "
              "per device; add devices or pick a smaller shape.", file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)
    step_s, result = fits[0].predicted_step_s, fits[0].plan
    workload = fits[0].layout.workload(workload)
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
        f"remat={config.remat_policy}: {fits[0].peak_bytes / layouts.GIB:.1f} of "
        f"{memory_gib:g} GiB",
        f"  {plan_recipe.train_steps:,} steps; predicted {step_s:.2f} s/step at full batch "
        f"({layouts.hardware_rate(config, seq_len, mfu):.1%} of peak in hardware FLOPs, plus "
        "collectives), "
        f"{tokens_per_s:,.0f} tokens/s",
        f"  {metrics.format_duration(train_s)} to train by the planner = "
        f"{train_s / 3600 * num_devices:,.0f} GPU-hours"
        + (f" ({train_s / 3600 * num_devices / request.gpu_hours:.0%} of the budget)"
           if request.gpu_hours is not None else "")
        + f"; {metrics.format_duration(compute_s)} at {mfu:.1%} MFU with no time lost to "
        "collectives",
        f"  checkpoints: {saves:,} saves, every {every:,} steps ({every * step_s / 3600:.1f} h), "
        f"{checkpoint_bytes / layouts.GIB:,.1f} GiB each (float32 parameters and Adam moments); "
        f"the last {keep} kept: {keep * checkpoint_bytes / layouts.GIB:,.1f} GiB on disk",
        f"  recipe: batch ramp {plan_recipe.ramp.start} -> {plan_recipe.batch_size} "
        f"(+{plan_recipe.ramp.increment}) over {plan_recipe.ramp.rampup_samples:,} samples, "
        f"warmup {short(plan_recipe.warmup_tokens)} tokens, cosine decay to "
        f"{short(plan_recipe.decay_tokens)} tokens, lr {plan_recipe.peak_lr:.3g} -> "
        f"{plan_recipe.min_lr:.3g}",
    ]))
    if write_gin:
        header = (f"BLOOM-style {config.n_layer} x {config.hidden_size} for {flops_budget:.4g} "
                  f"model FLOPs on {num_devices} x {device.name}, written by\n{command}")
        layout = fits[0].layout
        extra = ([f"logical_axis_rules.sequence_parallel = {layout.sequence_parallel}"]
                 + [f"Workload.gather_weights_once = {layout.gather_weights_once}"]
                 + ([f"Workload.pipeline_micro_steps = {layout.pipeline_micro_steps}"]
                    if layout.pipeline_micro_steps else [])
                 + ([f"Workload.pipeline_repeats = {layout.pipeline_repeats}"]
                    if layout.pipeline_repeats > 1 else []))
        pathlib.Path(write_gin).write_text(recipe.gin_config(
            config, plan_recipe, result.mesh, micro_batch_size, every, header).rstrip("\n")
            + "\n" + "\n".join(extra) + "\n")
        print(f"wrote {write_gin}")


def fit_runs(run_dirs: Sequence[str], flops_budget: float | None, task: str,
             resamples: int) -> None:
    """--fit: the law of the runs (their final eval/loss/`task`), its bootstrap uncertainty
    over `resamples`, and its prediction at the budget (default: BLOOM-176B's compute)."""
    found = [runs.read_run(run_dir, task) for run_dir in run_dirs]
    print(f"{len(found)} runs (final eval/loss/{task}):")
    for run in found:
        print(f"  {run.model_dir}: {run.params:,} parameters, {short(run.tokens)} tokens, "
              f"loss {run.loss:.4f} at step {run.step}")
    data = [np.array([getattr(run, field) for run in found], np.float64)
            for field in ("params", "tokens", "loss")]
    law = scaling.fit(*data)
    resampled = scaling.bootstrap(*data, resamples=resamples)
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
