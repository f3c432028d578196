"""Checks, before anything is compiled, that a mesh divides every array axis the rules shard.

jit rejects an argument whose sharded dimension the mesh does not divide, deep inside
compilation and naming no model dimension. These checks name the logical axis, its size and
the mesh axes, and propose meshes of the same devices that do divide.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from partitioning.mesh import MESH_AXES, MeshError, factorizations, format_shape
from partitioning.rules import Rules


@dataclasses.dataclass(frozen=True)
class ShardedAxis:
    """One array axis that the rules shard: its logical name, size and mesh axes."""

    name: str
    size: int
    mesh_axes: tuple[str, ...]
    example: str  # an array that has it, for the error message


def _as_tuple(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def sharded_axes(
    abstract_params: Any, rules: Rules, batch_shape: tuple[int, int] | None = None,
) -> list[ShardedAxis]:
    """The sharded axes of the parameters (boxed, from `jax.eval_shape(model.init, ...)`) and
    of the activations.

    An activation axis "activation_X" has the size of the parameter axis "X" (the model's naming
    convention); "activation_batch" and "activation_length" (and the residual stream's
    "activation_norm_length") take `batch_shape`.
    """
    axes = []
    sizes = collections.defaultdict(set)
    boxes = jax.tree_util.tree_leaves_with_path(
        abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, box in boxes:
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        spec = nn.logical_to_mesh_axes(box.names, rules)
        for name, size, mesh_axes in zip(box.names, box.value.shape, spec):
            sizes[f"activation_{name}"].add(size)
            if mesh_axes:
                axes.append(ShardedAxis(name, size, _as_tuple(mesh_axes), where))
    if batch_shape is not None:
        sizes["activation_batch"].add(batch_shape[0])
        sizes["activation_length"].add(batch_shape[1])
        sizes["activation_norm_length"].add(batch_shape[1])
    for name, mesh_axes in rules:
        if name.startswith("activation_") and mesh_axes:
            axes.extend(ShardedAxis(name, size, _as_tuple(mesh_axes), "activations")
                        for size in sorted(sizes[name]))
    return axes


def mesh_problems(mesh_shape: Mapping[str, int], axes: list[ShardedAxis]) -> list[str]:
    """One line per (size, mesh axes) that do not divide; empty if the mesh fits every axis."""
    names = collections.defaultdict(list)  # (size, mesh axes) -> logical names
    examples = {}
    for axis in axes:
        key = (axis.size, axis.mesh_axes)
        if axis.size % math.prod(mesh_shape[a] for a in axis.mesh_axes):
            names[key] += [axis.name] if axis.name not in names[key] else []
            examples.setdefault(key, axis.example)
    return [
        f"{' / '.join(repr(n) for n in names[size, mesh_axes])} (size {size}, in "
        f"{examples[size, mesh_axes]}) is sharded over "
        + " x ".join(f"{a}={mesh_shape[a]}" for a in mesh_axes) + ", which does not divide it"
        for size, mesh_axes in names
    ]


def divisible_meshes(num_devices: int, axes: list[ShardedAxis],
                     stage: int = 1) -> list[dict[str, int]]:
    """Meshes of `num_devices` with `stage` pipeline stages that divide every sharded axis, least
    tensor parallelism (the most communication) first, then most fsdp (the least memory)."""
    fits = [shape for shape in factorizations(num_devices, stage)
            if not mesh_problems(shape, axes)]
    return sorted(fits, key=lambda shape: (shape["tensor"], -shape["fsdp"]))


def _nearest_device_counts(num_devices: int, axes: list[ShardedAxis]) -> list[str]:
    """The closest smaller and larger device counts that some mesh fits, with that mesh."""
    found = []
    for candidates in (range(num_devices - 1, 0, -1), range(num_devices + 1, 2 * num_devices + 1)):
        for count in candidates:
            if meshes := divisible_meshes(count, axes):
                found.append(f"{count} devices ({format_shape(meshes[0])})")
                break
    return found


def _proposal(num_devices: int, axes: list[ShardedAxis], stage: int) -> str:
    meshes = divisible_meshes(num_devices, axes, stage)
    if meshes:
        return (f"Meshes of {num_devices} devices that divide every sharded axis: "
                + "; ".join(f"({format_shape(shape)})" for shape in meshes[:5]) + ".")
    sizes = {axis.size for axis in axes}
    primes = [p for p in range(2, num_devices + 1)
              if num_devices % p == 0 and all(p % q for q in range(2, p))]
    missing = [p for p in primes if not any(s % p == 0 for s in sizes)]
    reason = (f" {num_devices} has the prime factor(s) {missing}, which no sharded axis size has "
              f"({', '.join(str(s) for s in sorted(sizes))})." if missing else "")
    return (f"No (data, fsdp, tensor) mesh of {num_devices} devices divides every sharded "
            f"axis.{reason} Meshes that do exist for " + " and ".join(
                _nearest_device_counts(num_devices, axes)) + "; or change the batch size "
            "or the rules.")


def check_mesh(
    mesh_shape: Mapping[str, int],
    abstract_params: Any,
    rules: Rules,
    batch_shape: tuple[int, int] | None = None,
) -> None:
    """Raises MeshError naming every axis the mesh does not divide, and meshes that would.

    mesh_shape: `mesh.shape`, or any {"stage": .., "data": .., "fsdp": .., "tensor": ..}
        mapping.
    abstract_params: the boxed "params" of `jax.eval_shape(model.init, ...)`.
    batch_shape: the global [batch, length] of one forward pass (one micro-batch when
        gradients are accumulated), if the batch is to be checked too.
    """
    axes = sharded_axes(abstract_params, rules, batch_shape)
    problems = mesh_problems(mesh_shape, axes)
    if problems:
        num_devices = math.prod(mesh_shape[a] for a in MESH_AXES)
        raise MeshError(
            f"The mesh ({format_shape({a: mesh_shape[a] for a in MESH_AXES})}) does not "
            "divide the arrays it shards:\n  - " + "\n  - ".join(problems) + "\n"
            + _proposal(num_devices, axes, mesh_shape["stage"]))
