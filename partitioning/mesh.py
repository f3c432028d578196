"""The device mesh: named axes `stage`, `data`, `fsdp` and `tensor` over the devices of all
processes.

`stage` splits the layer stack into pipeline stages (size 1, the default: no pipeline); `data`
replicates parameters and splits the batch; `fsdp` splits the batch and shards parameters and
optimizer state (ZeRO-3); `tensor` shards heads and the MLP (Megatron). The layout keeps the
chattiest axis, `tensor`, inside one host and lets `stage` and `data`, which send only
activations and one gradient reduction per step, span hosts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils

# Outermost (across hosts) to innermost (inside a host).
MESH_AXES = ("stage", "data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh that does not fit the devices, or does not divide the arrays it shards."""


def factorizations(num_devices: int, stage: int = 1) -> list[dict[str, int]]:
    """Every (data, fsdp, tensor) whose product with `stage` is `num_devices`, as mesh shapes."""
    per_stage = num_devices // stage
    divisors = [d for d in range(1, per_stage + 1) if per_stage % d == 0]
    return [
        dict(zip(MESH_AXES, (stage, per_stage // (fsdp * tensor), fsdp, tensor)))
        for fsdp in divisors for tensor in divisors if per_stage % (fsdp * tensor) == 0
    ]


def shown(shape: dict[str, int]) -> dict[str, int]:
    """The axes worth naming: all but a `stage` of 1 (no pipeline)."""
    return {axis: size for axis, size in shape.items() if axis != "stage" or size != 1}


def format_shape(shape: dict[str, int]) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in shown(shape).items())


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int,
                       stage: int = 1) -> dict[str, int]:
    """Mesh axis sizes with the one -1 (if any) inferred; raises MeshError if they cannot fit."""
    shape = dict(zip(MESH_AXES, (stage, data, fsdp, tensor)))
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
                   f"{' x '.join(shown(shape))} = {known}, but there are {num_devices} devices")
        requested = dict(zip(MESH_AXES, (stage, data, fsdp, tensor)))
        closest = sorted(factorizations(num_devices, stage if num_devices % stage == 0 else 1),
                         key=lambda s: sum(s[axis] != requested[axis] for axis in MESH_AXES))
        raise MeshError(
            f"Mesh ({format_shape(requested)}): {problem}. The sizes must multiply to the "
            f"device count; e.g. " + "; ".join(format_shape(s) for s in closest[:3]) + ".")
    return shape


def hosts_split(shape: dict[str, int], num_hosts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Splits a mesh shape into (per host, across hosts) shapes: hosts go on `stage`, then
    `data`, then `fsdp`.

    `tensor` never crosses a host, so it must divide the devices of one host.
    """
    per_host_devices = math.prod(shape.values()) // num_hosts
    if per_host_devices % shape["tensor"]:
        raise MeshError(
            f"tensor={shape['tensor']} must stay inside one host, but a host has "
            f"{per_host_devices} devices; choose a tensor size that divides "
            f"{per_host_devices}.")
    across_stage = math.gcd(shape["stage"], num_hosts)
    across_data = math.gcd(shape["data"], num_hosts // across_stage)
    across_fsdp = num_hosts // (across_stage * across_data)
    if shape["fsdp"] % across_fsdp:
        raise MeshError(
            f"The {num_hosts} hosts cannot be laid out over {format_shape(shape)}: make "
            f"stage x data a multiple of the host count, or stage x data x fsdp a multiple of "
            f"it with tensor inside one host.")
    across = (across_stage, across_data, across_fsdp, 1)
    return tuple(size // n for size, n in zip(shape.values(), across)), across


def device_grid(shape: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged as a [stage, data, fsdp, tensor] array by jax's topology-aware
    mesh_utils."""
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
    stage: int = 1,
    devices: Sequence[Any] | None = None,
) -> jax.sharding.Mesh:
    """A (stage, data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    At most one size may be -1, inferred from the device count. gin:
        create_mesh.data = -1
        create_mesh.fsdp = 8
        create_mesh.tensor = 4
        create_mesh.stage = 1     # pipeline stages: > 1 splits the layers over them
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices), stage)
    return jax.sharding.Mesh(device_grid(shape, devices), MESH_AXES)
