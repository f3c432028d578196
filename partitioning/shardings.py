"""NamedShardings for parameters, optimizer state and batches, and sharded initialization.

Everything starts from the abstract, boxed parameters of `jax.eval_shape(model.init, ...)`:
each leaf carries its logical axis names, which the rules turn into mesh axes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from partitioning.rules import Rules
from partitioning.validation import check_mesh

BATCH_AXES = ("activation_batch", "activation_length")  # every batch array is [batch, length]


def abstract_params(model: nn.Module, *inputs: jax.ShapeDtypeStruct) -> Any:
    """The model's "params", boxed with logical names, as shapes only (nothing is allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


def logical_shardings(abstract: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """A NamedSharding for every leaf of a boxed tree (unboxed leaves are replicated)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)


def optimizer_shardings(
    optimizer: optax.GradientTransformation, abstract: Any, mesh: jax.sharding.Mesh,
    rules: Rules,
) -> Any:
    """Shardings of `optimizer.init(params)`: Adam's mu and nu like the parameters, the rest
    (step counts, scalars) replicated.

    The optimizer is initialized on the boxed abstract parameters, so every copy of the tree in its
    state keeps the logical names (flax's and MaxText's idiom); a mask function it applies sees
    `nn.Partitioned` boxes around the leaves, so it must select leaves by their dict keys.
    """
    return logical_shardings(jax.eval_shape(optimizer.init, abstract), mesh, rules)


def batch_sharding(
    mesh: jax.sharding.Mesh, rules: Rules, micro_batch_axis: bool = False,
) -> NamedSharding:
    """The sharding of every [batch, length] array of a batch, or of [micro_batches, batch,
    length] arrays (micro-batches stacked for gradient accumulation) with `micro_batch_axis`."""
    spec = nn.logical_to_mesh_axes(BATCH_AXES, rules)
    return NamedSharding(mesh, PartitionSpec(None, *spec) if micro_batch_axis else spec)


def put_batch(
    batch: Mapping[str, np.ndarray], sharding: NamedSharding,
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch (each process passes its own)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def init_sharded(init_fn: Callable[[], Any], shardings: Any) -> Any:
    """`init_fn()` (boxed or plain leaves) computed already sharded: each device creates only its
    shards. Returns plain arrays; `shardings` is `logical_shardings(jax.eval_shape(init_fn), ...)`.
    """
    return jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()


def init_params(
    model: nn.Module,
    rng: jax.Array,
    *inputs: jax.ShapeDtypeStruct,
    mesh: jax.sharding.Mesh,
    rules: Rules,
) -> Any:
    """The model's "params", created already sharded.

    inputs: shapes of the arguments of `model.init` after the rng, e.g. the [batch, length]
    input ids. Raises MeshError before compiling if the mesh does not divide the parameters.
    """
    abstract = abstract_params(model, *inputs)
    check_mesh(mesh.shape, abstract, rules)
    def init() -> Any:
        return model.init(rng, *(jnp.zeros(x.shape, x.dtype) for x in inputs))["params"]

    # out_shardings alone makes XLA create each shard on its own device (threefry is
    # partitionable), so no activation rules are needed for the discarded forward pass.
    return init_sharded(init, logical_shardings(abstract, mesh, rules))
