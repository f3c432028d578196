"""The train and eval steps jitted on a device mesh, and the workload they are shaped for.

`Workload` is what one optimizer step processes (model, global batch, sequence length,
micro-batch), as gin binds it; `shard_training` lays the train state and batches out on a mesh
and jits the step for them, `shard_eval` does the same for the eval step. The loop, the planner,
the benchmark and the evaluation all take their steps from here.

Every jitted callable carries its mesh and logical-axis rules (`MeshFunction`): the model's
`nn.with_logical_constraint` calls only shard inside that context, and a step traced outside it
would run silently unconstrained, so no caller enters it by hand.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bloom_jax import configs
from bloom_jax import lora as lora_lib
from bloom_jax import model as model_lib
from bloom_jax import optim
from bloom_jax import step as step_lib
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib
from partitioning import validation

# gin's handle on the model config (the model itself knows nothing of gin):
# `Workload.model_config = @BloomConfig()` with `BloomConfig.n_layer = 70`, ...
BloomConfig = gin.external_configurable(model_lib.BloomConfig, module="bloom_jax")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Workload:
    """What one optimizer step processes; gin binds it from the macros (see base.gin).

    micro_batch_size: sequences per data-parallel shard per micro-step (Megatron's MBS); a
      global batch is accumulated over ceil(batch / (micro_batch_size x data x fsdp))
      micro-steps, rows beyond the batch masked out. None: one micro-step holds the whole batch.
    batch_ramp: the global batch size over the run; `batch_size` is its final size.
    lora: train low-rank adapters on a frozen base instead of every parameter (None: full
      training). Gin: `Workload.lora = @LoraConfig()`.
    pipeline_micro_steps: on a mesh with pipeline stages, the micro-steps that go through the
      pipeline together, whose activations and logits are held at once; a step takes passes of
      them (its micro-steps rounded up to a multiple, the surplus masked). Each pass idles
      (stages - 1) / (pipeline_micro_steps x pipeline_repeats + stages - 1). None: one pass of
      all the micro-steps.
    pipeline_repeats: rounds each micro-step makes through the pipeline's stages, each stage
      running 1 / pipeline_repeats of its layers per round (a circular pipeline: the bubble
      shrinks by this factor, the stage-to-stage transfers grow by it). Needs passes of at
      least as many micro-steps as stages.
    gather_weights_once: all-gather the FSDP-sharded weights (in the compute dtype) once per
      step, before the micro-steps, instead of in every micro-step's forward and backward;
      costs the gathered weights' memory for the whole step.
    """

    model_config: model_lib.BloomConfig = gin.REQUIRED
    sequence_length: int = gin.REQUIRED
    micro_batch_size: int | None = None
    batch_ramp: optim.BatchRampUp = dataclasses.field(default_factory=optim.BatchRampUp)
    lora: lora_lib.LoraConfig | None = None
    pipeline_micro_steps: int | None = None
    pipeline_repeats: int = 1
    gather_weights_once: bool = False

    def __post_init__(self):
        configs.check_int("SEQUENCE_LENGTH", self.sequence_length, "2048")
        if self.pipeline_micro_steps is not None:
            configs.check_int("Workload.pipeline_micro_steps", self.pipeline_micro_steps, "8")
        configs.check_int("Workload.pipeline_repeats", self.pipeline_repeats, "1")
        if self.gather_weights_once and self.lora is not None:
            raise ValueError("Workload.gather_weights_once applies to full training; with "
                             "Workload.lora set it to False.")

    @property
    def batch_size(self) -> int:
        """Global sequences per optimizer step once the ramp is over."""
        return self.batch_ramp.global_batch_size

    @property
    def tokens(self) -> int:
        return self.batch_size * self.sequence_length

    def micro_batch(self, mesh: jax.sharding.Mesh) -> int:
        """Global sequences per micro-step on `mesh`."""
        if self.micro_batch_size is None:
            return self.batch_size
        return self.micro_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]

    def pipeline_pass(self, batch_size: int, micro_batch: int) -> int:
        """Micro-steps of `micro_batch` sequences that go through a pipeline together:
        `pipeline_micro_steps`, or all that hold `batch_size` sequences."""
        return self.pipeline_micro_steps or micro_steps(batch_size, micro_batch)


def micro_steps(batch_size: int, micro_batch: int) -> int:
    """Micro-steps that hold `batch_size` sequences; the last one's surplus rows are masked."""
    return -(-batch_size // micro_batch)


@dataclasses.dataclass(frozen=True)
class MeshFunction:
    """A jitted function that traces, compiles and runs inside its own mesh-and-rules context.

    jit does not key its cache on the rules a trace ran under, so each MeshFunction owns its
    jitted function: one per (mesh, rules).
    """

    fn: Any  # a jax.jit function, or its compiled form (`.lower(...).compile()`)
    mesh: jax.sharding.Mesh
    rules: rules_lib.Rules

    def __call__(self, *args):
        with rules_lib.activation_sharding(self.mesh, self.rules):
            return self.fn(*args)

    def lower(self, *args):
        with rules_lib.activation_sharding(self.mesh, self.rules):
            return _MeshLowered(self.fn.lower(*args), self)


@dataclasses.dataclass(frozen=True)
class _MeshLowered:
    """A lowered MeshFunction whose `compile()` gives a callable that runs in the same context."""

    lowered: Any
    function: MeshFunction

    def compile(self) -> MeshFunction:
        with rules_lib.activation_sharding(self.function.mesh, self.function.rules):
            compiled = self.lowered.compile()
        return dataclasses.replace(self.function, fn=compiled)

    def as_text(self) -> str:
        return self.lowered.as_text()


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
    """The train step jitted for a mesh, with the shapes and shardings of what it consumes.

    With LoRA the state's params are the adapters and the step takes the frozen base parameters
    as a last argument, laid out as training lays out parameters (`base_shardings`).
    """

    workload: Workload
    mesh: jax.sharding.Mesh
    rules: rules_lib.Rules
    model: model_lib.BloomForCausalLM
    optimizer: optax.GradientTransformation
    micro_batch: int  # global sequences per micro-step
    abstract_state: step_lib.TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings
    state_shardings: step_lib.TrainState
    batch_sharding: jax.sharding.NamedSharding  # of [micro_steps, micro_batch, length] arrays
    step: MeshFunction  # (state, batch, batch_size[, base]) -> (state, metrics); donates state
    base_shardings: Any = None  # LoRA's frozen parameters; None: full training
    abstract_base: Any = None  # their shapes, carrying the shardings

    @property
    def abstract_args(self) -> tuple:
        """The step's arguments after (state, batch, batch_size), as shapes: the base, if any."""
        return () if self.abstract_base is None else (self.abstract_base,)

    def micro_steps(self, batch_size: int) -> int:
        """Micro-steps that hold `batch_size` sequences, in whole pipeline passes."""
        steps = micro_steps(batch_size, self.micro_batch)
        per_pass = self.pipeline_pass(batch_size)
        return -(-steps // per_pass) * per_pass

    def pipeline_pass(self, batch_size: int) -> int:
        """Micro-steps that go through the pipeline together (1 without pipeline stages)."""
        if self.mesh.shape["stage"] == 1:
            return 1
        return self.workload.pipeline_pass(batch_size, self.micro_batch)

    @property
    def buffer_micro_steps(self) -> int:
        """Micro-steps of every batch the step takes: the final batch's. A smaller batch of the
        ramp is padded to it (`padded`), so the step compiles once for the whole run."""
        return self.micro_steps(self.workload.batch_size)

    def padded(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """[micro_steps, micro_batch, length] host arrays padded with zeros to
        [buffer_micro_steps, micro_batch, length]; the step never reads the padding."""
        missing = self.buffer_micro_steps - len(host_batch["input_ids"])
        return {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1))
                for k, v in host_batch.items()}

    def init_state(self, seed: int) -> step_lib.TrainState:
        """A fresh state, each device creating only its own shards."""
        ids = jnp.zeros((1, 1), jnp.int32)

        def init_params():
            key = jax.random.PRNGKey(seed)
            if self.workload.lora is None:
                return self.model.init(key, ids)["params"]
            return lora_lib.init_adapters(self.workload.lora, boxed_params(self.model), key)

        # The optimizer state is created after the parameters, over them (donated): the random
        # bits of the largest parameter take twice its bytes while they are drawn (560M: 2 GiB
        # beside the whole state when made at once).
        params = shardings_lib.init_sharded(init_params, self.state_shardings.params)
        return jax.jit(functools.partial(step_lib.create_train_state, optimizer=self.optimizer,
                                         seed=seed),
                       out_shardings=self.state_shardings, donate_argnums=0)(params)


# XLA's CPU scheduler by default orders the step for concurrency, keeping more buffers live at
# once: 0.9 GiB more temporaries in the 560M smoke step (`plan`). No other backend reads it.
STEP_COMPILER_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


def shard_training(workload: Workload, mesh: jax.sharding.Mesh, rules: rules_lib.Rules,
                   skip_policy: step_lib.SkipPolicy | None = None) -> ShardedTraining:
    """Lays the train state and batches out on `mesh` and jits the step for them.

    Raises partitioning's MeshError, naming each array the mesh does not divide and meshes that
    would, before anything is compiled.
    """
    stages = mesh.shape["stage"]
    micro_batch = workload.micro_batch(mesh)
    check_stages(workload, stages, micro_batch)
    repeats = workload.pipeline_repeats if stages > 1 else 1
    rules = rules_lib.pipeline_rules(rules, workload.model_config.n_layer, stages, repeats)
    model = model_lib.BloomForCausalLM(workload.model_config, stages=stages, repeats=repeats)
    optimizer = optim.make_optimizer()
    boxed_model_params = boxed_params(model)
    validation.check_mesh(mesh.shape, boxed_model_params, rules,
                          (micro_batch, workload.sequence_length))
    skip_policy = skip_policy or step_lib.SkipPolicy()
    trained, base_shardings, abstract_base = boxed_model_params, None, None
    shardings = shardings_lib.logical_shardings(boxed_model_params, mesh, rules)
    dtype = workload.model_config.dtype
    if workload.gather_weights_once:
        gather = functools.partial(gather_weights, shardings=shardings, dtype=dtype)
        scatter = functools.partial(_laid_out, shardings=shardings)
    else:
        gather, scatter = functools.partial(cast_weights, dtype=dtype), None
    make_step = step_lib.make_train_step(model, optimizer, skip_policy,
                                         workload.pipeline_micro_steps, gather=gather,
                                         scatter=scatter)
    if workload.lora is not None:
        trained = lora_lib.abstract_adapters(workload.lora, boxed_model_params)
        base_shardings = shardings_lib.logical_shardings(boxed_model_params, mesh, rules)
        abstract_base = _with_shardings(nn.unbox(boxed_model_params), base_shardings)
        make_step = lora_lib.make_train_step(model, workload.lora, optimizer, skip_policy)
    boxed_state = jax.eval_shape(
        lambda p: step_lib.create_train_state(p, optimizer, seed=0), trained)
    state_shardings = shardings_lib.logical_shardings(boxed_state, mesh, rules)
    abstract_state = _with_shardings(nn.unbox(boxed_state), state_shardings)
    batch_sharding = shardings_lib.batch_sharding(mesh, rules, micro_batch_axis=True)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    base_in = () if base_shardings is None else (base_shardings,)
    step = jax.jit(
        make_step,
        in_shardings=(state_shardings, batch_sharding, replicated, *base_in),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
        compiler_options=STEP_COMPILER_OPTIONS,
    )
    return ShardedTraining(workload, mesh, rules, model, optimizer, micro_batch, abstract_state,
                           state_shardings, batch_sharding, MeshFunction(step, mesh, rules),
                           base_shardings, abstract_base)


def check_stages(workload: Workload, stages: int, micro_batch: int) -> None:
    """Raises MeshError unless every one of `stages` pipeline stages gets a layer (stacks that
    the stages x `Workload.pipeline_repeats` groups of layers do not divide are padded,
    model.pipelined_layers), rounds through the stages go with passes of at least as many
    micro-steps as stages (of `micro_batch` sequences), and the run is not LoRA's, which is not
    pipelined."""
    if stages == 1:
        return
    layers, repeats = workload.model_config.n_layer, workload.pipeline_repeats
    padded = model_lib.padded_layers(layers, stages * repeats)
    if padded - layers >= padded / stages:
        raise mesh_lib.MeshError(
            f"n_layer={layers} layers leave a stage of stage={stages} pipeline stages without "
            f"a layer (padded to {padded} for Workload.pipeline_repeats={repeats}); set "
            f"create_mesh.stage to at most {layers // repeats}, or fewer repeats.")
    per_pass = workload.pipeline_pass(workload.batch_size, micro_batch)
    if repeats > 1 and per_pass < stages:
        raise mesh_lib.MeshError(
            f"Workload.pipeline_repeats={repeats} needs passes of at least stage={stages} "
            f"micro-steps, got {per_pass}; set Workload.pipeline_micro_steps to at least "
            f"{stages}, or Workload.pipeline_repeats = 1.")
    if workload.lora is not None:
        raise mesh_lib.MeshError("LoRA does not run pipelined; set create_mesh.stage = 1.")


# Parameters the layers cast to the compute dtype before use: gathered already cast, so the step
# computes the same numbers from half the bytes.
CAST_PARAMETERS = ("kernel", "embedding")


def cast_weights(params: Any, dtype: Any) -> Any:
    """Kernels and embeddings in `dtype`, where they stay: each micro-step's FSDP all-gathers
    then move compute-dtype weights, not float32 ones."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.astype(dtype) if path[-1].key in CAST_PARAMETERS else p, params)


def gather_weights(params: Any, shardings: Any, dtype: Any) -> Any:
    """The parameters replicated over `fsdp` (and `data`), kernels and embeddings in `dtype`."""
    def gather(path, param, sharding):
        spec = jax.sharding.PartitionSpec(*map(_without_batch_axes, sharding.spec))
        return jax.lax.with_sharding_constraint(
            param, jax.sharding.NamedSharding(sharding.mesh, spec))
    return jax.tree_util.tree_map_with_path(gather, cast_weights(params, dtype), shardings)


def _without_batch_axes(axes: Any) -> Any:
    """A PartitionSpec entry without `data` and `fsdp`."""
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                 if a not in ("data", "fsdp"))
    return kept[0] if len(kept) == 1 else kept or None


def _laid_out(grads: Any, shardings: Any) -> Any:
    """Gradients as float32 in the parameters' layout (a reduce-scatter over `fsdp`)."""
    return jax.tree.map(lambda g, s: jax.lax.with_sharding_constraint(g.astype(jnp.float32), s),
                        grads, shardings)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def boxed_params(model: model_lib.BloomForCausalLM) -> Any:
    """The model's parameters, boxed with their logical axis names, as shapes only."""
    return shardings_lib.abstract_params(model, jax.ShapeDtypeStruct((1, 1), jnp.int32))


def param_shardings(model: model_lib.BloomForCausalLM, mesh: jax.sharding.Mesh,
                    rules: rules_lib.Rules) -> Any:
    """Where each parameter lives on `mesh`, as training places it."""
    return shardings_lib.logical_shardings(boxed_params(model), mesh, rules)


@dataclasses.dataclass(frozen=True)
class ShardedEval:
    """The eval step jitted for a mesh: (params, [batch, length] batch) -> replicated
    (summed token losses, summed loss weights)."""

    model: model_lib.BloomForCausalLM
    batch_sharding: jax.sharding.NamedSharding  # of [batch, length] arrays
    step: MeshFunction


def shard_eval(model: model_lib.BloomForCausalLM, mesh: jax.sharding.Mesh,
               rules: rules_lib.Rules, batch_size: int, sequence_length: int) -> ShardedEval:
    """The eval step on `mesh`; raises MeshError if the mesh does not divide the eval batches."""
    axes = validation.sharded_axes({}, rules, (batch_size, sequence_length))
    problems = validation.mesh_problems(mesh.shape, axes)
    if problems:
        raise mesh_lib.MeshError(
            f"Eval batches of {batch_size} sequences of {sequence_length} tokens do not fit the "
            f"mesh: {'; '.join(problems)}. Choose an eval batch size the mesh divides "
            "(--batch_size, or train.eval_batch_size in gin).")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(functools.partial(step_lib.eval_step, model),
                   out_shardings=(replicated, replicated))
    return ShardedEval(model, shardings_lib.batch_sharding(mesh, rules),
                       MeshFunction(step, mesh, rules))

