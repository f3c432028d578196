"""`python -m bloom_jax.plan`: will a configuration fit, and how fast will it run?

Compiles the real train step ahead of time on abstract arrays (`jax.ShapeDtypeStruct`; nothing is
allocated) on a mesh of N devices, which may be simulated CPU devices, and prints the parameter
count, the mesh and each parameter's sharding, per-device bytes (parameters, gradients, optimizer
state, XLA's temporaries) with `per_device_peak_bytes`, the remat checkpoints per sequence, the
collectives read from the compiled program by link, and the step time by the overlap model of
layouts.py, cross-checked with the analytic formula (`--json`: one JSON object).

    python -m bloom_jax.plan --gin_file=gin_configs/bloom176b.gin --num_devices=384 --json
    python -m bloom_jax.plan --gin_file=gin_configs/bloom176b.gin --num_devices=384 --search

Exits 0 when the peak fits `--memory_gib`, 3 (naming the largest consumer) when it does not, and
2 when the mesh does not divide the model or the devices (with meshes that would).

Before a model is chosen, `--budget` (GPU-hours; or `--budget_flops`) says what a compute budget
buys, and `--fit RUN_DIR...` fits L(N, D) to finished runs (budget_report.py):

    python -m bloom_jax.plan --budget=1.08e6 --gpu=a100-80gb --num_devices=384 --write_gin=x.gin
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence

import jax
from absl import app, flags

from bloom_jax import budget, budget_report, configs, flops, layouts, scaling, sharded_step
from bloom_jax.model import padded_layers
from partitioning.mesh import MeshError, create_mesh, format_shape, shown
from partitioning import rules as rules_lib
from partitioning.rules import logical_axis_rules

FLAGS = flags.FLAGS
GIB = layouts.GIB
EXIT_DOES_NOT_FIT = budget_report.EXIT_DOES_NOT_FIT
EXIT_BAD_MESH = 2


def define_flags() -> None:
    """The planner's own flags (configs.run adds the gin flags and --verbose)."""
    flags.DEFINE_integer("num_devices", None,
                         "Simulate this many CPU devices (default: the real ones).")
    flags.DEFINE_float("memory_gib", 80.0, "Memory of one device, GiB (A100-80GB and H100: 80; "
                       "--budget: default the --gpu's).")
    flags.DEFINE_float("hfu", layouts.BLOOM_HFU, "Share of the bfloat16 peak at which the "
                       "hardware FLOPs (recomputation counted) run; default BLOOM's measured "
                       "150 of 312 TFLOP/s.")
    flags.DEFINE_float("mfu", budget.BLOOM_MFU, "--budget and --fit: model FLOPs utilization "
                       "(default BLOOM-176B's measured); the layouts' hardware FLOPs run at the "
                       "rate a fully recomputing step has at this MFU.")
    flags.DEFINE_bool("search", False, "Rank the meshes, micro-batch sizes, SP, remat policies "
                      "and weight gathering that fit, by predicted step time.")
    flags.DEFINE_float("search_seconds", 60.0, "--search: compile the most promising layouts "
                       "(by the analytic model), each once, while the next compile (timed as "
                       "the last one) ends within this many seconds.")
    flags.DEFINE_integer("search_compiles", None, "--search: compile at most this many layouts "
                         "(default: as many as --search_seconds allows). With a --search_seconds "
                         "that is never reached, the same layouts on any machine.",
                         lower_bound=1)
    flags.DEFINE_bool("json", False, "Print the plan as one JSON object (--search: a list).")
    flags.DEFINE_string("gpu", "A100", "GPU the step time and --budget plan for, any case: one "
                        f"of {', '.join(budget.GPUS)}.")
    flags.DEFINE_float("nvlink_gbps", None, "NVLink bandwidth per GPU and direction, GB/s "
                       "(default: the --gpu's; A100 300).")
    flags.DEFINE_float("network_gbps", None, "Network bandwidth per GPU and direction between "
                       "nodes, GB/s (default: the --gpu's; A100 6.25, i.e. 50 Gb/s as on "
                       "BLOOM's cluster).")
    flags.DEFINE_integer("devices_per_host", 8, "GPUs per node: collectives inside one go over "
                         "NVLink; `tensor` stays inside one (search).")
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


def links(gpu: str) -> tuple[float, float]:
    """(NVLink, network) bytes/s per GPU and direction: the flags', else the GPU's."""
    nvlink, network = layouts.LINKS[gpu]
    return (nvlink if FLAGS.nvlink_gbps is None else FLAGS.nvlink_gbps * 1e9,
            network if FLAGS.network_gbps is None else FLAGS.network_gbps * 1e9)


def plan_json(candidate: layouts.Candidate, workload: sharded_step.Workload) -> dict:
    """The issue's planner summary: one object per layout."""
    plan, layout, predicted = candidate.plan, candidate.layout, candidate.compiled
    config = layout.workload(workload).model_config
    rows = plan.micro_batches * plan.micro_batch
    hardware = flops.hardware_flops_per_step(config, rows, workload.sequence_length)
    return {
        "mesh": shown(plan.mesh),
        "micro_batch": layout.micro_batch_size,
        "micro_steps": plan.micro_batches,
        "stages": plan.mesh.get("stage", 1),
        "repeats": layout.pipeline_repeats,
        "sp": layout.sequence_parallel,
        "remat": layout.remat,
        "compute_s": predicted.compute_s,
        "comm_bytes": {link: int(b) for link, b in predicted.comm_bytes.items()},
        "predicted_step_s": predicted.step_s,
        "predicted_tflops_per_device": round(flops.tflops_per_device(
            hardware, predicted.step_s, math.prod(plan.mesh.values())), 2),
        "per_device_peak_bytes": candidate.peak_bytes,
    }


def format_plan(candidate: layouts.Candidate, workload: sharded_step.Workload, gpu: str,
                hfu: float) -> str:
    """The report: counts, mesh, shardings, memory, collectives and predicted speed."""
    plan, layout = candidate.plan, candidate.layout
    config, seq_len = layout.workload(workload).model_config, workload.sequence_length
    num_devices = math.prod(plan.mesh.values())
    stages = plan.mesh.get("stage", 1)
    per_pass, repeats = layout.micro_steps(workload.batch_size)[1], layout.pipeline_repeats
    padded = padded_layers(config.n_layer, stages * repeats)
    transfer = flops.stage_transfer_bytes(config, plan.micro_batch, seq_len, plan.mesh,
                                          layout.sequence_parallel)
    compiled, analytic = candidate.compiled, candidate.analytic
    by_kind = {}
    for c in plan.collectives:
        key = f"{c.kind} over {','.join(c.axes) or '-'} ({c.link})"
        by_kind[key] = by_kind.get(key, 0.0) + c.wire_bytes * c.count
    checkpoint = "none (no remat)" if config.remat_policy == "none" else "{:,.1f} MiB".format(
        layouts.checkpoint_bytes_per_sequence(config, seq_len, plan.mesh.get("tensor", 1),
                                              layout.sequence_parallel) / 2**20)
    lines = [
        f"parameters: {flops.param_count(config)}",
        f"mesh: {format_shape(plan.mesh)} ({num_devices} devices)",
        f"batch: {workload.batch_size} sequences x {seq_len} tokens = {plan.micro_batches} "
        f"micro-steps of {plan.micro_batch} sequences (remat: {config.remat_policy}, "
        f"sequence parallel: {layout.sequence_parallel}, weights gathered once per step: "
        f"{layout.gather_weights_once})",
        *([f"pipeline: {stages} stages of {padded // stages} layers ({padded - config.n_layer} "
           f"of them pass-throughs) in {repeats} round(s), passes of {per_pass} micro-steps, "
           f"bubble {flops.pipeline_bubble(stages, per_pass, repeats):.1%} (in the predicted "
           f"compute); {budget.short(transfer)}B per device to the next stage per iteration"]
          if stages > 1 else []),
        "sharding (parameter: shape -> mesh axes):",
        *(f"  {name}: {shape} -> {spec}" for name, shape, spec in plan.shardings),
        "per-device memory:",
        f"  parameters:      {plan.param_bytes / GIB:9.2f} GiB",
        f"  gradients:       {plan.grad_bytes / GIB:9.2f} GiB (float32 accumulators, "
        "in XLA temp)",
        f"  optimizer state: {plan.optimizer_bytes / GIB:9.2f} GiB",
        f"  XLA temporaries: {plan.temp_bytes / GIB:9.2f} GiB (activations, gathered weights, "
        "gradients)",
        f"  remat checkpoints per sequence: {checkpoint}"
        + (" (in pinned host memory, not counted in the peak)"
           if config.remat_policy in layouts.OFFLOADED else ""),
        f"per_device_peak_bytes: {candidate.peak_bytes}",
        f"model FLOPs per step: {flops.flops_per_step(config, workload.batch_size, seq_len):.4g}"
        f" (per token: {flops.flops_per_token(config, seq_len):.4g}; hardware, with remat "
        f"{config.remat_policy}'s recomputation"
        f"{' and the sliced loss head' if config.loss_vocab_chunks > 1 else ''}: "
        f"{flops.hardware_flops_per_step(config, 1, seq_len) / seq_len:.4g})",
        "collectives per step, wire bytes per device (from the compiled program):",
        *(f"  {key}: {b / 2**20:,.1f} MiB" for key, b in sorted(by_kind.items())),
        f"predicted on {gpu} (hardware FLOPs at {hfu:.1%} of peak; NVLink "
        f"{links(gpu)[0] / 1e9:g} GB/s, network {links(gpu)[1] / 1e9:g} GB/s per GPU):",
        f"  {'':9s} {'compute':>9s} {'overlapped':>10s} {'exposed':>9s} {'step':>9s}  "
        f"{'nvlink':>9s} {'network':>9s}",
        *(f"  {name:9s} {p.compute_s:9.2f} {p.overlapped_s:10.2f} {p.exposed_s:9.2f} "
          f"{p.step_s:9.2f}  {p.comm_bytes['nvlink'] / GIB:7.1f}Gi "
          f"{p.comm_bytes['network'] / GIB:7.1f}Gi"
          for name, p in (("compiled", compiled), ("analytic", analytic))),
        f"  {workload.tokens / compiled.step_s:,.0f} tokens/s, "
        f"{plan_json(candidate, workload)['predicted_tflops_per_device']} TFLOP/s per device",
        f"compiled in {plan.compile_s:.1f} s",
    ]
    return "\n".join(lines)


def largest_consumer(plan: layouts.Plan) -> str:
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
    return budget.budget_flops(FLAGS.budget, budget.gpu(FLAGS.gpu), FLAGS.mfu)


def _search(workload: sharded_step.Workload, gpu: str, memory: int) -> None:
    """--search: the layouts that fit, fastest first."""
    ranked, weighed = layouts.search(workload, jax.device_count(), memory, gpu, FLAGS.hfu,
                                     links(gpu), FLAGS.devices_per_host, FLAGS.search_seconds,
                                     FLAGS.search_compiles or math.inf,
                                     log=lambda line: print(line, file=sys.stderr, flush=True))
    if FLAGS.json:
        print(json.dumps([plan_json(c, workload) for c in ranked]))
    else:
        print(f"{len(ranked)} compiled layouts fit {FLAGS.memory_gib:g} GiB (of {weighed} "
              f"weighed by the analytic model); fastest first, on {gpu} at {FLAGS.hfu:.1%} of "
              "peak in hardware FLOPs:")
        for c in ranked:
            print(f"  {c.predicted_step_s:9.4g} s/step (analytic {c.analytic.step_s:9.4g})  "
                  f"{c.layout.describe()}  peak={c.peak_bytes / GIB:.1f} GiB")
    sys.exit(0 if ranked else EXIT_DOES_NOT_FIT)


def main(argv: Sequence[str]) -> None:
    flops_budget = _budget_flops()
    if FLAGS.fit:
        if len(argv) < 2:
            raise app.UsageError("--fit needs the runs' MODEL_DIRs as arguments.")
        budget_report.fit_runs(argv[1:], flops_budget, FLAGS.fit_task, FLAGS.bootstrap)
        return
    configs.no_arguments(argv)
    if FLAGS.num_devices:
        _simulate_devices(FLAGS.num_devices)
    gpu = budget.gpu(FLAGS.gpu)
    if flops_budget is not None:
        budget_report.plan_budget(budget_report.BudgetRequest(
            flops_budget, FLAGS.budget, gpu, jax.device_count(), FLAGS.mfu,
            FLAGS.memory_gib if FLAGS["memory_gib"].present else gpu.memory_gib, FLAGS.law,
            FLAGS.devices_per_host, links(gpu.name)),
            FLAGS.write_gin, f"python -m bloom_jax.plan {' '.join(sys.argv[1:])}")
        return
    configs.parse_flags(skip_unknown=configs.OUTSIDE_THE_STEP)
    workload = sharded_step.Workload()
    memory = int(FLAGS.memory_gib * GIB)
    if FLAGS.search:
        _search(workload, gpu.name, memory)
    mesh, rules = create_mesh(), logical_axis_rules()
    ranks = mesh.shape["data"] * mesh.shape["fsdp"]
    layout = layouts.Layout(
        dict(mesh.shape), workload.micro_batch_size or -(-workload.batch_size // ranks),
        sequence_parallel=rules_lib.sequence_parallel(rules),
        remat=workload.model_config.remat_policy,
        gather_weights_once=workload.gather_weights_once,
        pipeline_micro_steps=workload.pipeline_micro_steps,
        pipeline_repeats=workload.pipeline_repeats)
    candidate = layouts.evaluate(workload, layout, gpu.name, FLAGS.hfu, links(gpu.name),
                                 FLAGS.devices_per_host, compile_it=True, rules=rules)
    if FLAGS.json:
        print(json.dumps(plan_json(candidate, workload)))
    else:
        print(format_plan(candidate, workload, gpu.name, FLAGS.hfu))
    if candidate.peak_bytes > memory:
        print(f"does not fit: {candidate.peak_bytes / GIB:.1f} GiB per device > "
              f"{FLAGS.memory_gib} GiB; largest consumer: {largest_consumer(candidate.plan)}",
              file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)
    if not FLAGS.json:
        print(f"fits: {candidate.peak_bytes / GIB:.1f} GiB of {FLAGS.memory_gib} GiB per device")


if __name__ == "__main__":
    define_flags()
    configs.run(main, exit_codes={MeshError: EXIT_BAD_MESH})
