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
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from bloom_jax import configs, flops, sharded_step
from bloom_jax.data import pipeline
from bloom_jax.model import BloomConfig
from partitioning.mesh import MeshError, create_mesh, factorizations, format_shape
from partitioning.rules import Rules, logical_axis_rules

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The planner's own flags (configs.run adds the gin flags and --verbose)."""
    flags.DEFINE_integer("num_devices", None,
                         "Simulate this many CPU devices (default: the real ones).")
    flags.DEFINE_float("memory_gib", 80.0, "Memory of one device, GiB (A100-80GB and H100: 80).")
    flags.DEFINE_float("mfu", 0.40, "Model FLOPs utilization to predict the step time at.")
    flags.DEFINE_bool("search", False, "Try the meshes, micro-batch sizes and remat policies "
                      "that divide and fit, and rank them by predicted step time.")
    flags.DEFINE_string("gpu", "A100", "GPU the search ranks for: one of "
                        f"{sorted(flops.PEAK_FLOPS)}.")
    flags.DEFINE_integer("devices_per_host", 8, "GPUs per host: `tensor` stays inside one "
                         "(search).")


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
                                   jax.ShapeDtypeStruct((), jnp.int32)).compile()
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
        param_bytes=_shard_bytes(params, param_shardings),
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
    lines = [
        f"parameters: {flops.param_count(config)}",
        f"mesh: {format_shape(plan.mesh)} ({num_devices} devices)",
        f"batch: {batch_size} sequences x {seq_len} tokens = {plan.micro_batches} micro-steps "
        f"of {plan.micro_batch} sequences (remat: {config.remat_policy})",
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
        f"{flops.flops_per_token(config, seq_len):.4g}; with recomputation: "
        f"{flops.flops_per_token(config, seq_len, config.recompute):.4g})",
        f"predicted at {mfu:.0%} MFU (bfloat16 dense peak):",
    ]
    for gpu in GPUS:
        step_s = model_flops / (num_devices * flops.PEAK_FLOPS[gpu]["bfloat16"] * mfu)
        lines.append(f"  {gpu:9s} {step_s:9.2f} s/step  {batch_size * seq_len / step_s:12,.0f} "
                     f"tokens/s")
    lines.append(f"compiled in {plan.compile_s:.1f} s")
    return "\n".join(lines)


def predicted_step_s(plan: Plan, config: BloomConfig, seq_len: int, gpu: str, mfu: float,
                     devices_per_host: int) -> float:
    """Compute at `mfu` of the bfloat16 peak (hardware FLOPs: recomputation and padded rows
    count) plus the collectives of FSDP and tensor parallelism at LINKS bandwidth.

    Per micro-step, FSDP all-gathers each layer's bfloat16 weights (forward, backward and, with
    recomputation, again) and reduce-scatters float32 gradients; tensor parallelism all-reduces
    2 activations per layer forward and 2 backward.
    """
    mesh, devices = plan.mesh, math.prod(plan.mesh.values())
    rows = plan.micro_batches * plan.micro_batch
    compute_s = (flops.flops_per_step(config, rows, seq_len, config.recompute)
                 / (devices * flops.PEAK_FLOPS[gpu]["bfloat16"] * mfu))
    nvlink, network = LINKS[gpu]
    params = flops.param_count(config) / mesh["tensor"]
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731  (fraction a ring moves)
    gathers = 3 if config.recompute else 2
    fsdp_bytes = params * (2 * gathers + 4) * ring(mesh["fsdp"]) * plan.micro_batches
    activation = plan.micro_batch / (mesh["data"] * mesh["fsdp"]) * seq_len * config.hidden_size
    tensor_bytes = (4 * activation * 2 * 2 * config.n_layer * ring(mesh["tensor"])
                    * plan.micro_batches)
    fsdp_link = nvlink if mesh["fsdp"] * mesh["tensor"] <= devices_per_host else network
    grads_allreduce = 2 * 4 * params / mesh["fsdp"] * ring(mesh["data"])
    return compute_s + fsdp_bytes / fsdp_link + tensor_bytes / nvlink + grads_allreduce / network


def search(workload: sharded_step.Workload, num_devices: int, rules: Rules, memory: int,
           mfu: float, gpu: str, devices_per_host: int,
           ) -> list[tuple[float, Plan, sharded_step.Workload]]:
    """Every (mesh, micro-batch size, remat) whose mesh divides and whose step fits `memory`,
    fastest first (predicted on `gpu` at `mfu`); meshes whose float32 state alone cannot fit,
    or whose `tensor` axis spans hosts, are not compiled."""
    devices = jax.devices()[:num_devices]
    state_bytes = 16 * flops.param_count(workload.model_config)  # params, grads, Adam's mu, nu
    results = []
    for shape in factorizations(num_devices):
        if shape["tensor"] > devices_per_host or (
                state_bytes / (shape["fsdp"] * shape["tensor"]) > memory):
            continue
        mesh = create_mesh(**shape, devices=devices)
        for micro_batch_size in SEARCH_MICRO_BATCH_SIZES:
            for remat in SEARCH_REMAT_POLICIES:
                candidate = dataclasses.replace(
                    workload, micro_batch_size=micro_batch_size,
                    model_config=dataclasses.replace(workload.model_config, remat_policy=remat))
                try:
                    result = plan_step(candidate, mesh, rules)
                except MeshError:
                    break  # the same for every remat policy
                print(f"  tried {format_shape(shape)}, micro_batch_size={micro_batch_size}, "
                      f"remat={remat}: {result.peak_bytes / GIB:.1f} GiB", flush=True)
                if result.peak_bytes <= memory:
                    step_s = predicted_step_s(result, candidate.model_config,
                                              workload.sequence_length, gpu, mfu,
                                              devices_per_host)
                    results.append((step_s, result, candidate))
    return sorted(results, key=lambda r: r[0])


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


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    if FLAGS.num_devices:
        _simulate_devices(FLAGS.num_devices)
    configs.parse_flags(skip_unknown=configs.LOOP_CONFIGURABLES)
    workload = sharded_step.Workload()
    memory = int(FLAGS.memory_gib * GIB)
    if FLAGS.search:
        ranked = search(workload, jax.device_count(), logical_axis_rules(), memory, FLAGS.mfu,
                        FLAGS.gpu, FLAGS.devices_per_host)
        print(f"{len(ranked)} configurations fit {FLAGS.memory_gib} GiB; fastest first "
              f"(predicted on {FLAGS.gpu} at {FLAGS.mfu:.0%} MFU):")
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
