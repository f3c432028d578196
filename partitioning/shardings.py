"""NamedShardings for parameters, optimizer state and batches, and sharded initialization.

Everything starts from the abstract, boxed parameters of `jax.eval_shape(model.init, ...)`:
each leaf carries its logical axis names, which the rules turn into mesh axes.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def param_shardings(abstract: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """A NamedSharding for every leaf of a boxed tree (unboxed leaves are replicated)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)


def optimizer_shardings(
        optimizer: optax.GradientTransformation, abstract: Any, mesh: jax.sharding.Mesh,
        rules: Rules,
) -> Any:
    """Shardings of `optimizer.init(params)`: every copy of the parameter tree in the state (Adam's
    mu and nu) is sharded like the parameters, everything else (step counts) replicated.

    optax.tree_map_params finds those copies, with the optimizer seeing the real, unboxed
    parameter tree (so path-based masks such as a weight-decay mask work).
    """
    state = jax.eval_shape(optimizer.init, nn.unbox(abstract))
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
            optimizer,
            lambda _, sharding: sharding,
            state,
            param_shardings(abstract, mesh, rules),
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """The sharding of every [batch, length] array of a training batch."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules))


def put_batch(
        batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Rules,
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch (each process passes its own)."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def init_params(
        model: nn.Module,
        rng: jax.Array,
        *inputs: jax.ShapeDtypeStruct,
        mesh: jax.sharding.Mesh,
        rules: Rules,
) -> Any:
    """The model's "params", created already sharded: each device computes only its shards.

    inputs: shapes of the arguments of `model.init` after the rng, e.g. the [batch, length]
    input ids. Returns plain (unboxed) arrays; raises MeshError before compiling if the mesh
    does not divide the parameters.
    """
    abstract = abstract_params(model, *inputs)
    check_mesh(mesh.shape, abstract, rules)

    def init(rng: jax.Array) -> Any:
        variables = model.init(rng, *(jnp.zeros(x.shape, x.dtype) for x in inputs))
        return nn.unbox(variables["params"])

    # out_shardings alone makes XLA create each shard on its own device (threefry is
    # partitionable), so no activation rules are needed for the discarded forward pass.
    return jax.jit(init, out_shardings=param_shardings(abstract, mesh, rules))(rng)
