"""Train-step layouts compiled on abstract arrays: memory, collectives and predicted step time.

A layout is a mesh (with `stage` > 1, a pipeline), a micro-batch size, sequence parallelism, a remat
policy, whether FSDP weights are gathered once per step and, pipelined, the micro-steps of one pass
through the pipeline and the rounds each makes through the stages. `plan_step` compiles the
trainer's real step for one (nothing is allocated) and reads the per-device memory and the
collectives (collectives.py) from the compiled program. `predict` turns them into a step time by the
overlap model:

    step_s = max(compute_s, overlapped_s) + exposed_s

compute_s is the hardware FLOPs (the remat policy's recomputation and masked rows counted) at `hfu`
of the bfloat16 peak; pipelined, of the layer stack padded to a multiple of the layer groups,
stretched by the bubble: x (M R + S - 1) / (M R) for passes of M micro-steps making R rounds through
S stages. Every collective takes wire bytes / its link's bandwidth. Collectives over `tensor` alone
carry activations the next operation waits for (Megatron's all-reduces, or SP's all-gathers and
reduce-scatters), and so do collective permutes (a pipeline stage's output, which the next stage
waits for): exposed. All others move weights and gradients (FSDP gathers and reduce-scatters within
a stage, the data-parallel all-reduce), which XLA's scheduler runs beside the layers' compute:
overlapped, as long as compute lasts. `analytic_collectives` gives the same collectives by formula;
`search` ranks layouts by it, then compiles the most promising.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax import collectives, flops, sharded_step
from bloom_jax.collectives import Collective
from bloom_jax.data import packing
from bloom_jax.model import BloomConfig, padded_layers
from partitioning.mesh import MeshError, create_mesh, factorizations
from partitioning.rules import logical_axis_rules

GIB = 2**30
# Bandwidth per GPU and direction, bytes/s: (NVLink inside a node, network between nodes).
# A100: BLOOM's cluster (Jean Zay): NVLink3, and about 50 Gb/s per GPU between nodes.
LINKS = {"A100": (300e9, 50e9 / 8), "H100-SXM": (450e9, 400e9 / 8),
         "H100-PCIe": (64e9, 200e9 / 8), "H200": (450e9, 400e9 / 8)}
# BLOOM's measured hardware FLOPs rate: ~150 TFLOP/s of an A100's 312 (Megatron's K = 4).
BLOOM_HFU = 150 / 312
SEARCH_REMAT_POLICIES = ("full", "dots_with_no_batch_dims", "selective", "layer_inputs_offloaded")
# Remat policies whose backward pass recomputes the layers' weight matmuls (gathering again).
RECOMPUTES_WEIGHTS = ("full", "layer_inputs", "layer_inputs_offloaded")
OFFLOADED = ("layer_inputs_offloaded",)
# What the CPU compiles hold per sequence over memory_estimate's bytes per sequence, the most
# measured, unpipelined and pipelined: 5.1 for BLOOM-176B on 3 x 16 x 8 with SP, 9 sequences a
# micro-step (85.0 GiB; 2.6 without SP, 4 a micro-step); 1.16 for 8 stages x 3 x 2 x 8 with
# SP and selective remat, passes of 9 or 15 micro-steps in 9 rounds (60.4, 70.4 GiB; 1.12 for
# 19). `search` assumes it until a compile of the layout's kind measures its own.
FIRST_SCALE = {False: 5.1, True: 1.2}
# Passes of a step's micro-steps through a pipeline that the search weighs.
PIPELINE_PASSES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one train step is laid out on the devices."""

    mesh: dict[str, int]
    micro_batch_size: int  # sequences per data-parallel rank per micro-step
    sequence_parallel: bool
    remat: str
    gather_weights_once: bool
    pipeline_micro_steps: int | None = None  # per pass through the pipeline; None: all
    pipeline_repeats: int = 1  # rounds through the stages

    def workload(self, workload: sharded_step.Workload) -> sharded_step.Workload:
        return dataclasses.replace(
            workload, micro_batch_size=self.micro_batch_size,
            gather_weights_once=self.gather_weights_once,
            pipeline_micro_steps=self.pipeline_micro_steps,
            pipeline_repeats=self.pipeline_repeats,
            model_config=dataclasses.replace(workload.model_config, remat_policy=self.remat))

    def micro_steps(self, batch_size: int) -> tuple[int, int]:
        """(Micro-steps per step, micro-steps per pass through the pipeline): in whole passes,
        as sharded_step.ShardedTraining counts them (1 a pass without stages)."""
        ranks = self.mesh.get("data", 1) * self.mesh.get("fsdp", 1)
        steps = sharded_step.micro_steps(batch_size, self.micro_batch_size * ranks)
        if self.mesh.get("stage", 1) == 1:
            return steps, 1
        per_pass = min(self.pipeline_micro_steps or steps, steps)
        return -(-steps // per_pass) * per_pass, per_pass

    def describe(self) -> str:
        passes = (f"  pipeline_micro_steps={self.pipeline_micro_steps}  pipeline_repeats="
                  f"{self.pipeline_repeats}" if self.mesh.get("stage", 1) > 1 else "")
        return (f"{', '.join(f'{a}={n}' for a, n in self.mesh.items())}  micro_batch_size="
                f"{self.micro_batch_size}  sp={self.sequence_parallel}  remat={self.remat}  "
                f"gather_once={self.gather_weights_once}{passes}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compiled train step needs per device, and the collectives it runs."""

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
    collectives: tuple[Collective, ...] = ()


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A step time by the overlap model (module docstring)."""

    compute_s: float
    comm_bytes: dict[str, float]  # wire bytes per device per step, by link
    overlapped_s: float  # weight and gradient collectives
    exposed_s: float  # activation collectives over `tensor`
    step_s: float


def _shard_bytes(tree: Any, shardings: Any, dtype: Any = None) -> int:
    """Bytes of one device's shards of `tree` (optionally as if stored in `dtype`)."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize,
        tree, shardings)
    return sum(jax.tree.leaves(sizes))


def plan_step(workload: sharded_step.Workload, mesh: jax.sharding.Mesh, rules: Any,
              devices_per_node: int = 8) -> Plan:
    """Compiles the trainer's step for `mesh` on abstract arrays and measures it per device.

    Raises MeshError, before compiling, when the mesh does not divide the model or micro-batch.
    """
    training = sharded_step.shard_training(workload, mesh, rules)
    micro_batches = training.micro_steps(workload.batch_size)
    batch = {k: jax.ShapeDtypeStruct((micro_batches, training.micro_batch,
                                      workload.sequence_length), dtype,
                                     sharding=training.batch_sharding)
             for k, dtype in packing.BATCH_FEATURES.items()}
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
        collectives=tuple(collectives.read(compiled.fn.as_text(), dict(mesh.shape),
                                           devices_per_node, unknown_trips=micro_batches
                                           // training.pipeline_pass(workload.batch_size))),
    )


def checkpoint_bytes_per_sequence(config: BloomConfig, seq_len: int, tensor: int,
                                  sequence_parallel: bool) -> int:
    """Bytes one sequence's remat checkpoints keep on a device across the forward pass: each
    layer's compute-dtype input (sharded over `tensor` with SP), and with
    dots_with_no_batch_dims the outputs of the weight matmuls too (qkv, the attention
    projection, both MLP matmuls), with selective qkv, the residual after attention (as the
    input) and the MLP's hidden layer; none on the device when offloaded. An estimate of what
    XLA keeps, from the policy."""
    itemsize, h = jnp.dtype(config.dtype).itemsize, config.hidden_size
    residual = h / (tensor if sequence_parallel else 1)
    per_token = {"none": 0, "full": residual, "layer_inputs": residual,
                 "layer_inputs_offloaded": 0,
                 "selective": 2 * residual + 3 * h / tensor + 4 * h / tensor}
    per_token["dots"] = per_token["dots_with_no_batch_dims"] = (
        residual + 3 * h / tensor + h + 4 * h / tensor + h)
    if config.remat_policy == "none":
        raise ValueError("remat_policy 'none' keeps every activation; no checkpoints to count")
    return int(config.n_layer * seq_len * per_token[config.remat_policy] * itemsize)


def device_peak_bytes(plan: Plan, config: BloomConfig, layout: Layout, seq_len: int) -> int:
    """The compiled peak; for an offloaded policy, less the layer inputs that go to host memory
    (the CPU compiler, on which the planner compiles, keeps them on the device)."""
    if config.remat_policy not in OFFLOADED:
        return plan.peak_bytes
    kept = dataclasses.replace(config, remat_policy="layer_inputs")
    return plan.peak_bytes - layout.micro_batch_size * checkpoint_bytes_per_sequence(
        kept, seq_len, layout.mesh.get("tensor", 1), layout.sequence_parallel)


def hardware_rate(config: BloomConfig, seq_len: int, mfu: float) -> float:
    """The share of peak at which a device runs hardware FLOPs when a step that recomputes every
    layer (as BLOOM's did) reaches `mfu` in model FLOPs: BLOOM-176B's 35.8% is 47.6%."""
    return mfu * flops.flops_per_token(config, seq_len, "full") / flops.flops_per_token(
        config, seq_len)


def compute_s(config: BloomConfig, rows: int, seq_len: int, num_devices: int, gpu: str,
              hfu: float, stages: int = 1, per_pass: int = 1, repeats: int = 1) -> float:
    """Hardware FLOPs of `rows` sequences (the remat policy's recomputation counted) at `hfu`
    of the bfloat16 peak. Pipelined over `stages`, the padded layers' too (model.padded_layers),
    and every pass of `per_pass` micro-steps making `repeats` rounds takes per_pass x repeats +
    stages - 1 iterations (the bubble; the LM head, outside the pipeline, is stretched with the
    layers: ~0.1% too long for BLOOM-176B)."""
    padded = dataclasses.replace(config, n_layer=padded_layers(config.n_layer, stages * repeats))
    return (flops.hardware_flops_per_step(padded, rows, seq_len)
            / (num_devices * flops.PEAK_FLOPS[gpu]["bfloat16"] * hfu)
            / (1 - flops.pipeline_bubble(stages, per_pass, repeats)))


def predict(found: Any, compute: float, links: tuple[float, float]) -> Prediction:
    """The step time of `found` collectives beside `compute` seconds, by the overlap model."""
    bandwidth = dict(zip(collectives.LINKS, links))
    exposed = overlapped = 0.0
    for c in found:
        seconds = c.wire_bytes * c.count / bandwidth[c.link]
        if c.axes == ("tensor",) or c.kind == "collective-permute":
            exposed += seconds
        else:
            overlapped += seconds
    comm_bytes = {link: 0.0 for link in collectives.LINKS}
    comm_bytes.update(collectives.wire_bytes_by(found))
    return Prediction(compute, comm_bytes, overlapped, exposed,
                      max(compute, overlapped) + exposed)


@functools.lru_cache(maxsize=None)
def _axis_link(mesh_items: tuple[tuple[str, int], ...], axes: tuple[str, ...],
               devices_per_node: int) -> str:
    """The link a collective over `axes` of a mesh ((axis, size) pairs) takes (logical ids in
    row-major order)."""
    mesh = dict(mesh_items)
    ids = np.arange(math.prod(mesh.values())).reshape(tuple(mesh.values()))
    varying = [list(mesh).index(a) for a in axes]
    fixed = [i for i in range(len(mesh)) if i not in varying]
    nodes = ids.transpose(fixed + varying).reshape(-1, math.prod(mesh[a] for a in axes)) // (
        devices_per_node)
    return "network" if (nodes.min(axis=1) != nodes.max(axis=1)).any() else "nvlink"


def analytic_collectives(config: BloomConfig, layout: Layout, batch_size: int, seq_len: int,
                         devices_per_node: int) -> list[Collective]:
    """The collectives of a step by formula, per device (P_t = a stage's parameters / tensor:
    its share of the padded layers and the embedding). A "run" is a micro-step, or pipelined
    one iteration of a pass (M R + S - 1 per pass of M micro-steps making R rounds, each
    through 1 / R of a stage's layers):
    - FSDP all-gathers of the compute-dtype weights, P_t x itemsize x (f - 1) / f per use:
      once per step with gather_weights_once, pipelined once per pass (into the pipeline's
      manual region), else per micro-step forward, backward and in a recompute of the weight
      matmuls;
    - FSDP reduce-scatters of the gradients, P_t x itemsize x (f - 1) / f (float32 with
      gather_weights_once, which converts them before scattering), per micro-step or pass;
    - the data-parallel all-reduce of the float32 gradient shards, 2 x 4 P_t / f x (d - 1) / d
      per micro-step (pipelined: per pass);
    - over `tensor`, per layer and run 2 activations of m x s x h (compute dtype) in the
      forward, 2 in the backward: all-reduces, or with SP an all-gather and a reduce-scatter
      each (the same wire bytes); 2 more where the policy recomputes the weight matmuls, and
      with SP the 2 all-gathers of the LayerNorms' outputs (1 all-reduce's bytes) where it
      recomputes less;
    - pipelined, a permute of each run's m x s x h activations (over `tensor` with SP) to the
      next stage forward, and of their gradients back.
    """
    mesh = layout.mesh
    d, f, t = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
    stages, repeats = mesh.get("stage", 1), layout.pipeline_repeats
    itemsize = jnp.dtype(config.dtype).itemsize
    micro_steps, per_pass = layout.micro_steps(batch_size)
    passes = micro_steps // per_pass
    runs = micro_steps if stages == 1 else passes * (per_pass * repeats + stages - 1)
    layers = padded_layers(config.n_layer, stages * repeats) // (stages * repeats)
    params_t = _stage_params(config, stages, repeats) / t
    recomputes_weights = layout.remat in RECOMPUTES_WEIGHTS
    uses = (1 if layout.gather_weights_once else passes if stages > 1
            else runs * (2 + recomputes_weights))
    scatters = passes if stages > 1 else runs
    activation = layout.micro_batch_size * seq_len * config.hidden_size * itemsize
    ring = lambda n: (n - 1) / n  # noqa: E731

    def entry(kind, wire, count, axes):
        return Collective(kind, 0, wire, math.prod(mesh[a] for a in axes), axes,
                          _axis_link(tuple(mesh.items()), axes, devices_per_node), count,
                          "analytic")

    found = []
    if f > 1:
        found.append(entry("all-gather", params_t * itemsize * ring(f), uses, ("fsdp",)))
        gradient = 4 if layout.gather_weights_once else itemsize
        found.append(entry("reduce-scatter", gradient * params_t * ring(f), scatters,
                           ("fsdp",)))
    if d > 1:
        found.append(entry("all-reduce", 2 * 4 * params_t / f * ring(d), scatters, ("data",)))
    if t > 1:
        recomputed = (2 if recomputes_weights else
                      1 if layout.remat != "none" and layout.sequence_parallel else 0)
        found.append(entry("all-reduce", 2 * activation * ring(t),
                           layers * (4 + recomputed) * runs, ("tensor",)))
    if stages > 1:
        transfer = flops.stage_transfer_bytes(config, layout.micro_batch_size * d * f, seq_len,
                                              mesh, layout.sequence_parallel)
        found.append(entry("collective-permute", transfer, 2 * runs, ("stage",)))
    return found


def memory_estimate(config: BloomConfig, layout: Layout, seq_len: int, batch_size: int,
                    ) -> tuple[float, float]:
    """(Bytes of a device independent of the micro-batch, bytes per sequence of it), estimated to
    prune the search: float32 parameters, gradient accumulators and Adam's two moments (16 bytes a
    parameter over stage x fsdp x tensor) and a stage's gathered weights with gather_weights_once;
    per sequence its remat checkpoints (in float32, as the CPU compile keeps them) and a working set
    of one layer's float32 attention probabilities and the float32 logits (a vocabulary slice's,
    with a sliced loss), each with its gradient. Pipelined, a stage's weights in a second copy
    (moved to the stages by an all-to-all), and a pass of M micro-steps keeps the checkpoints of one
    stage's layers for each of them, two of a stage's inputs of each of their M R iterations (as it
    came and as it was sent on), their outputs between rounds, and the pass's logits (split over the
    stages). `search` scales the per-sequence bytes by what its compiles measure."""
    mesh, params = layout.mesh, flops.param_count(config)
    f, t, stages = mesh.get("fsdp", 1), mesh.get("tensor", 1), mesh.get("stage", 1)
    per_pass = layout.micro_steps(batch_size)[1]
    per_stage = padded_layers(config.n_layer, stages * layout.pipeline_repeats) // stages
    # A stage's weights gathered (once per step, or pipelined for each pass: then twice, as
    # stored and moved to the stages) and, pipelined, their float32 gradients, summed over the
    # pass before they are reduced.
    itemsize = jnp.dtype(config.dtype).itemsize
    gathered = _stage_params(config, stages, layout.pipeline_repeats) / t * (
        (itemsize if layout.gather_weights_once else 0) + (2 * itemsize + 4 if stages > 1 else 0))
    # The CPU compile holds bfloat16 activations as float32: twice the checkpoints' bytes, of
    # which device_peak_bytes takes the bfloat16 half off for an offloaded policy.
    offloaded = config.remat_policy in OFFLOADED
    kept = _with_remat(config, "layer_inputs") if offloaded else config
    checkpoints = ((1 if offloaded else 2) * per_pass * per_stage / config.n_layer
                   * checkpoint_bytes_per_sequence(kept, seq_len, t, layout.sequence_parallel)
                   if config.remat_policy != "none" else 0)
    logits = 2 * 4 * seq_len * config.vocab_size / t / config.loss_vocab_chunks  # (a slice's)
    working = 2 * 4 * seq_len * config.n_head / t * seq_len + logits
    if stages > 1:
        outputs = 4 * seq_len * config.hidden_size / (t if layout.sequence_parallel else 1)
        working += per_pass * ((2 * layout.pipeline_repeats + 1) * outputs + logits / stages)
    return 16 * params / (stages * f * t) + gathered, checkpoints + working


def _divides(config: BloomConfig, mesh: dict[str, int], repeats: int = 1) -> bool:
    """Whether `mesh` divides the parameters as the rules shard them (`tensor`: heads, MLP and
    vocabulary; `fsdp`, and `stage` where its stages do not hold contiguous layers (uneven, or
    `repeats` > 1; rules.pipeline_rules): the model dimension), so that the search does not
    build a model to find out (validation.check_mesh does)."""
    t, f, stage = mesh["tensor"], mesh["fsdp"], mesh["stage"]
    embed = f * (stage if config.n_layer % stage or repeats > 1 else 1)
    return (config.n_head % t == 0 and config.vocab_size % t == 0
            and 4 * config.hidden_size % t == 0 and config.hidden_size % embed == 0)


def search_space(workload: sharded_step.Workload, num_devices: int, devices_per_node: int,
                 ) -> Iterator[Layout]:
    """Every layout the search weighs: meshes over the axes partitioning/mesh.py declares with
    `tensor` inside a node and every pipeline stage holding a layer; micro-batch sizes up to the
    per-rank batch, one per count of micro-steps (the smallest, for the fewest masked rows); SP
    on and off where `tensor` > 1; SEARCH_REMAT_POLICIES; gather_weights_once on and off where
    `fsdp` > 1; pipelined, the micro-steps in PIPELINE_PASSES passes (of as many micro-steps,
    the fewest masked), each of at least as many micro-steps as stages, and every count of
    rounds through the stages that needs no more padding layers than one round."""
    layers = workload.model_config.n_layer
    for stage in (s for s in range(1, min(num_devices, layers) + 1) if num_devices % s == 0):
        if padded_layers(layers, stage) - layers >= layers / stage:
            continue  # a stage without a layer (sharded_step.check_stages)
        per_stage = padded_layers(layers, stage) // stage
        rounds = [r for r in range(1, per_stage + 1) if per_stage % r == 0
                  and padded_layers(layers, stage * r) == per_stage * stage] if stage > 1 else [1]
        for mesh in factorizations(num_devices, stage):
            if mesh.get("tensor", 1) > devices_per_node:
                continue
            divided = [r for r in rounds if _divides(workload.model_config, mesh, r)]
            ranks = mesh.get("data", 1) * mesh.get("fsdp", 1)
            per_rank = -(-workload.batch_size // ranks)
            for micro_batch_size in sorted({-(-per_rank // steps)
                                            for steps in range(1, per_rank + 1)}):
                steps = -(-per_rank // micro_batch_size)
                passes = sorted({-(-steps // k) for k in PIPELINE_PASSES if k < steps})
                passes = [None] + [m for m in passes if m >= stage]
                pipelines = [(None, r) for r in divided] if stage == 1 else [
                    (m, r) for m in passes for r in divided if r == 1 or (m or steps) >= stage]
                for per_pass, repeats in pipelines:
                    for sp in (False, True) if mesh.get("tensor", 1) > 1 else (False,):
                        for remat in SEARCH_REMAT_POLICIES:
                            for once in (False, True) if mesh.get("fsdp", 1) > 1 else (False,):
                                yield Layout(mesh, micro_batch_size, sp, remat, once, per_pass,
                                             repeats)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A layout of the search: predicted by formula, and (when compiled) from its program."""

    layout: Layout
    analytic: Prediction
    plan: Plan | None = None
    compiled: Prediction | None = None
    peak_bytes: int | None = None  # on the device (offloaded checkpoints subtracted)

    @property
    def predicted_step_s(self) -> float:
        return (self.compiled or self.analytic).step_s


def evaluate(workload: sharded_step.Workload, layout: Layout, gpu: str, hfu: float,
             links: tuple[float, float], devices_per_node: int, compile_it: bool,
             rules: Any = None) -> Candidate | None:
    """A candidate's analytic prediction, and with `compile_it` its compiled plan and
    prediction; None when the mesh does not divide the model or batch (with `rules`, the
    rules as given, which raise MeshError instead; default: the layout's SP setting)."""
    config, seq_len = _with_remat(workload.model_config, layout.remat), workload.sequence_length
    num_devices = math.prod(layout.mesh.values())
    ranks = layout.mesh.get("data", 1) * layout.mesh.get("fsdp", 1)
    micro_steps, per_pass = layout.micro_steps(workload.batch_size)
    compute = compute_s(config, micro_steps * layout.micro_batch_size * ranks, seq_len,
                        num_devices, gpu, hfu, layout.mesh.get("stage", 1), per_pass,
                        layout.pipeline_repeats)
    analytic = predict(analytic_collectives(config, layout, workload.batch_size, seq_len,
                                            devices_per_node), compute, links)
    if not compile_it:
        return Candidate(layout, analytic)
    candidate = layout.workload(workload)
    mesh = create_mesh(**layout.mesh, devices=jax.devices()[:num_devices])
    if rules is not None:
        plan = plan_step(candidate, mesh, rules, devices_per_node)
    else:
        try:
            plan = plan_step(candidate, mesh,
                             logical_axis_rules(sequence_parallel=layout.sequence_parallel),
                             devices_per_node)
        except MeshError:
            return None
    return Candidate(layout, analytic, plan, predict(plan.collectives, compute, links),
                     device_peak_bytes(plan, config, layout, seq_len))


@functools.lru_cache(maxsize=None)
def _stage_params(config: BloomConfig, stages: int, repeats: int = 1) -> int:
    """Parameters one pipeline stage runs: its share of the padded layers, and the embedding."""
    outside = flops.param_count(dataclasses.replace(config, n_layer=0))
    per_layer = (flops.param_count(config) - outside) // config.n_layer
    return outside + padded_layers(config.n_layer, stages * repeats) // stages * per_layer


@functools.lru_cache(maxsize=None)
def _with_remat(config: BloomConfig, remat: str) -> BloomConfig:
    return dataclasses.replace(config, remat_policy=remat)


# Device memory of the remat policies, least first (layer_inputs keeps what full keeps).
_MEMORY_ORDER = {"layer_inputs_offloaded": 0, "full": 1, "layer_inputs": 1, "selective": 2,
                 "dots_with_no_batch_dims": 3, "dots": 4, "none": 5}


def _needs_no_less(layout: Layout, than: Layout) -> bool:
    """Whether `layout` needs at least the memory of `than` (same mesh; no smaller micro-batch
    or pipeline pass, no leaner remat policy, SP off where `than` has it off, weights gathered
    once where `than` gathers them once)."""
    def per_pass(a: Layout) -> float:
        return a.pipeline_micro_steps or math.inf
    return (layout.mesh == than.mesh and layout.micro_batch_size >= than.micro_batch_size
            and per_pass(layout) >= per_pass(than)
            and _MEMORY_ORDER[layout.remat] >= _MEMORY_ORDER[than.remat]
            and (than.sequence_parallel or not layout.sequence_parallel)
            and (layout.gather_weights_once or not than.gather_weights_once))


def search(workload: sharded_step.Workload, num_devices: int, memory: int, gpu: str,
           hfu: float, links: tuple[float, float], devices_per_node: int, seconds: float,
           compiles: float = math.inf, first: bool = False,
           log: Any = print) -> tuple[list[Candidate], int]:
    """The layouts that fit `memory`, fastest first by their compiled prediction, and how many
    layouts were weighed.

    Every layout whose memory_estimate fits is predicted by formula, and compiled in order of
    that prediction, each once, while the next compile (as long as the last one) ends within
    `seconds` and fewer than `compiles` have run (or, with `first`, until one fits), skipping
    any that needs no less memory than one that did not fit, or whose estimate, its bytes per
    sequence scaled by the compiles so far of its SP setting, tensor size and pipelining, does
    not fit.
    """
    # Measured / estimated bytes per sequence, the largest seen so far, by (SP, tensor size,
    # pipelined); FIRST_SCALE before a family's first compile.
    scales: dict[tuple[bool, int, bool], float] = {}

    def family(layout: Layout) -> tuple[bool, int, bool]:
        return (layout.sequence_parallel, layout.mesh.get("tensor", 1),
                layout.mesh.get("stage", 1) > 1)

    estimates: dict[tuple, tuple[float, float]] = {}

    def needs(layout: Layout) -> float:
        key = (tuple(layout.mesh.items()), layout.micro_batch_size, layout.sequence_parallel,
               layout.remat, layout.gather_weights_once, layout.pipeline_micro_steps,
               layout.pipeline_repeats)
        if key not in estimates:
            estimates[key] = memory_estimate(_with_remat(workload.model_config, layout.remat),
                                             layout, workload.sequence_length,
                                             workload.batch_size)
        fixed, per_sequence = estimates[key]
        return (fixed + scales.get(family(layout), FIRST_SCALE[family(layout)[2]])
                * layout.micro_batch_size
                * per_sequence)

    ranked = sorted(
        (evaluate(workload, layout, gpu, hfu, links, devices_per_node, False)
         for layout in search_space(workload, num_devices, devices_per_node)
         if needs(layout) <= memory),
        # On a tie SP comes last: it moves the same bytes by the formula, but its compiled
        # programs have gathered the FSDP weights more often (README, BLOOM-176B).
        key=lambda c: (round(c.analytic.step_s, 3), c.layout.sequence_parallel,
                       needs(c.layout)))
    fits, too_big, start, last_compile, compiled = [], [], time.perf_counter(), 0.0, 0
    for analytic in ranked:
        if (time.perf_counter() - start + last_compile > seconds or compiled >= compiles
                or (first and fits)):
            break
        if needs(analytic.layout) > memory or any(
                _needs_no_less(analytic.layout, big) for big in too_big):
            continue
        found = evaluate(workload, analytic.layout, gpu, hfu, links, devices_per_node, True)
        if found is None:
            continue
        last_compile, compiled = found.plan.compile_s, compiled + 1
        log(f"  compiled {found.layout.describe()}: {found.peak_bytes / GIB:.1f} GiB, "
            f"{found.predicted_step_s:.4g} s/step ({found.plan.compile_s:.0f} s)")
        fixed, per_sequence = memory_estimate(found.layout.workload(workload).model_config,
                                              found.layout, workload.sequence_length,
                                              workload.batch_size)
        scales[family(found.layout)] = max(scales.get(family(found.layout), 0.0), (
            found.peak_bytes - fixed) / (found.layout.micro_batch_size * per_sequence))
        if found.peak_bytes <= memory:
            fits.append(found)
        else:
            too_big.append(found.layout)
    return sorted(fits, key=lambda c: c.predicted_step_s), len(ranked)
