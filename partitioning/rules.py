"""The logical-to-mesh axis rules: one readable table that places every named array axis.

The model names its axes ("embed", "heads", "activation_batch", ...); a rule (name, mesh axes)
shards that axis over the given mesh axis, tuple of axes, or None (replicated). Flax applies the
rules in order and never uses a mesh axis twice within one array (t5x semantics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import gin
import jax

from partitioning.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # Parameters (and their gradients and optimizer state): the model dimension is sharded
    # ZeRO-3 style over fsdp; vocabulary, heads and MLP Megatron-style over tensor.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("qkv", None),
    ("kv", None),
    # The stacked layer axis is split into pipeline stages (contiguous layers per stage); with
    # stage=1 (the default mesh) this replicates it, as before.
    ("layers", "stage"),
    # Activations: the batch is split over every data-parallel device; heads, MLP and logits
    # follow their weights over tensor.
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_embed", None),
    ("activation_norm_length", None),  # the residual stream's length; "tensor" with SP
    ("activation_length", None),
    ("activation_kv", None),
    ("activation_stage", "stage"),  # the pipeline's per-stage activations [stages, batch, ...]
)


def _checked_rule(rule: Sequence) -> tuple[str, MeshAxes]:
    """A rule as a (name, mesh axes) tuple; gin gives lists, flax wants tuples."""
    if len(rule) != 2 or not isinstance(rule[0], str):
        raise ValueError(f"An axis rule is a (logical_name, mesh_axes) pair; got {rule!r}.")
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"Axis rule {rule!r} names mesh axes {unknown}; the mesh axes are {MESH_AXES} "
            "(or None to replicate).")
    return name, axes


# Megatron's sequence parallelism: outside the tensor-parallel regions (attention, MLP), the
# residual stream and its LayerNorm and dropout activations are sharded along the length over
# `tensor`; their all-reduces become an all-gather before and a reduce-scatter after each region.
SEQUENCE_PARALLEL_RULES: Rules = (("activation_norm_length", "tensor"),)


def sequence_parallel(rules: Rules) -> bool:
    """Whether `rules` shard the residual stream along its length (sequence parallelism)."""
    return dict(rules).get("activation_norm_length") is not None


@gin.configurable
def logical_axis_rules(overrides: Sequence[Sequence] = (),
                       sequence_parallel: bool = False) -> Rules:
    """DEFAULT_RULES with the rules of the names in `overrides` replaced by those overrides,
    and with `sequence_parallel` by SEQUENCE_PARALLEL_RULES (under the overrides).

    gin, e.g. to replicate the model dimension and shard sequences over fsdp:
        logical_axis_rules.overrides = [("embed", None), ("activation_length", "fsdp")]
        logical_axis_rules.sequence_parallel = True
    """
    overrides = tuple(_checked_rule(rule) for rule in overrides)
    if sequence_parallel:
        named = {name for name, _ in overrides}
        overrides += tuple(r for r in SEQUENCE_PARALLEL_RULES if r[0] not in named)
    replaced = {name for name, _ in overrides}
    return overrides + tuple(rule for rule in DEFAULT_RULES if rule[0] not in replaced)


def pipeline_rules(rules: Rules, n_layer: int, stages: int, repeats: int = 1) -> Rules:
    """`rules` for a pipeline of `stages` whose layers are not the stored stack's contiguous
    blocks: stages that do not divide the `n_layer` stacked layers (jit shards only evenly), or
    `repeats` > 1 (stage s runs every S-th group of layers). Every parameter's model dimension
    is then sharded over `stage` as well as its own axes, and the model pads the stack and
    moves each stage's layers to it at run time (an all-to-all each way: resharding the stored
    layer axis itself, XLA all-gathers the gradients over `stage`). "activation_stage" comes
    first, so that those layers take `stage` on their stage axis and "embed" then falls back to
    its own rule. Stages of contiguous blocks keep `rules`."""
    if n_layer % stages == 0 and repeats == 1:
        return rules
    named = dict(rules)
    embed = named.get("embed")
    embed = () if embed is None else (embed,) if isinstance(embed, str) else tuple(embed)
    return (("activation_stage", named.get("activation_stage")), ("embed", (*embed, "stage")),
            ("layers", None),
            *(rule for rule in rules if rule[0] not in ("activation_stage", "layers")))


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Scope in which the model's `nn.with_logical_constraint` calls shard over `mesh`.

    Tracing (the first call of a jitted function) must happen inside it: jit does not key its
    cache on the rules, so jit one function per (mesh, rules).
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
