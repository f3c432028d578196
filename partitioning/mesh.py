"""The device mesh: named axes `data`, `fsdp` and `tensor` over the devices of all processes.

`data` replicates parameters and splits the batch; `fsdp` splits the batch and shards parameters
and optimizer state (ZeRO-3); `tensor` shards heads and the MLP (Megatron). The layout keeps the
chattiest axis, `tensor`, inside one host and lets `data`, the quietest, span hosts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")  # outermost (across hosts) to innermost (inside a host)


class MeshError(ValueError):
    """A mesh that does not fit the devices, or does not divide the arrays it shards."""


def factorizations(num_devices: int) -> list[dict[str, int]]:
    """Every shape over MESH_AXES whose product is `num_devices` (the first axis, `data`, takes
    what the others leave)."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    shapes: list[dict[str, int]] = [{}]
    for axis in MESH_AXES[1:]:
        shapes = [{**shape, axis: d} for shape in shapes for d in divisors
                  if num_devices % (math.prod(shape.values()) * d) == 0]
    return [{MESH_AXES[0]: num_devices // math.prod(shape.values()), **shape}
            for shape in shapes]


def format_shape(shape: dict[str, int]) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in shape.items())


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with the one -1 (if any) inferred; raises MeshError if they cannot fit."""
    shape = dict(zip(MESH_AXES, (data, fsdp, tensor)))
    invalid = {axis: size for axis, size in shape.items() if size == 0 or size < -1}
    if invalid:
        raise MeshError(
            f"Mesh axis sizes must be positive, or -1 to infer one from the device count; "
            f"got {format_shape(invalid)}.")
    inferred = [axis for axis, size in shape.items() if size == -1]
    if len(inferred) > 1:
        raise MeshError(
            f"At most one mesh axis may be -1 (inferred), got {', '.join(inferred)}; "
            f"give all but one of them a size.")
    known = math.prod(size for size in shape.values() if size != -1)
    if inferred and num_devices % known == 0:
        shape[inferred[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        problem = (f"{inferred[0]} cannot be inferred: the other axes multiply to {known}, "
                   f"which does not divide the {num_devices} devices" if inferred else
                   f"data x fsdp x tensor = {known}, but there are {num_devices} devices")
        requested = dict(zip(MESH_AXES, (data, fsdp, tensor)))
        closest = sorted(factorizations(num_devices),
                         key=lambda s: sum(s[axis] != requested[axis] for axis in MESH_AXES))
        raise MeshError(
            f"Mesh ({format_shape(requested)}): {problem}. The sizes must multiply to the "
            f"device count; e.g. " + "; ".join(format_shape(s) for s in closest[:3]) + ".")
    return shape


def hosts_split(shape: dict[str, int], num_hosts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Splits a mesh shape into (per host, across hosts) shapes: hosts go on `data`, then `fsdp`.

    `tensor` never crosses a host, so it must divide the devices of one host.
    """
    per_host_devices = math.prod(shape.values()) // num_hosts
    if per_host_devices % shape["tensor"]:
        raise MeshError(
            f"tensor={shape['tensor']} must stay inside one host, but a host has "
            f"{per_host_devices} devices; choose a tensor size that divides "
            f"{per_host_devices}.")
    across_data = math.gcd(shape["data"], num_hosts)
    across_fsdp = num_hosts // across_data
    if shape["fsdp"] % across_fsdp:
        raise MeshError(
            f"The {num_hosts} hosts cannot be laid out over data={shape['data']} x "
            f"fsdp={shape['fsdp']}: make data a multiple of the host count, or data x fsdp "
            f"a multiple of it with tensor inside one host.")
    across = (across_data, across_fsdp, 1)
    return tuple(size // n for size, n in zip(shape.values(), across)), across


def device_grid(shape: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged as a [data, fsdp, tensor] array by jax's topology-aware mesh_utils."""
    num_hosts = len({device.process_index for device in devices})
    if num_hosts == 1:
        return mesh_utils.create_device_mesh(tuple(shape.values()), devices)
    per_host, across_hosts = hosts_split(shape, num_hosts)
    return mesh_utils.create_hybrid_device_mesh(
        per_host, across_hosts, devices, process_is_granule=True)


@gin.configurable
def create_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    At most one size may be -1, inferred from the device count. gin:
        create_mesh.data = -1
        create_mesh.fsdp = 8
        create_mesh.tensor = 4
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return jax.sharding.Mesh(device_grid(shape, devices), MESH_AXES)
