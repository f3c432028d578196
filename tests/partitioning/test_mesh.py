"""Mesh shapes, their errors, and the host-aware device layout."""

import dataclasses

import gin
import jax
import numpy as np
import pytest

from partitioning.mesh import MESH_AXES, MeshError, create_mesh, device_grid, resolve_mesh_shape


@pytest.mark.parametrize("sizes, expected", [
    ((-1, 2, 2), (2, 2, 2)),
    ((2, -1, 1), (2, 4, 1)),
    ((1, 4, -1), (1, 4, 2)),
    ((8, 1, 1), (8, 1, 1)),
])
def test_one_axis_is_inferred_from_the_device_count(sizes, expected):
    assert resolve_mesh_shape(*sizes, num_devices=8) == dict(zip(MESH_AXES, (1, *expected)))


def test_pipeline_stages_are_a_fourth_axis_of_size_one_unless_set():
    assert resolve_mesh_shape(-1, 2, 1, num_devices=8, stage=2) == dict(
        stage=2, data=2, fsdp=2, tensor=1)
    with pytest.raises(MeshError, match="stage x data x fsdp x tensor = 16, but there are 8"):
        resolve_mesh_shape(2, 2, 2, num_devices=8, stage=2)


def test_sizes_that_do_not_multiply_to_the_device_count_are_named_with_a_fix():
    with pytest.raises(MeshError, match="data x fsdp x tensor = 12, but there are 8 devices") as e:
        resolve_mesh_shape(3, 2, 2, num_devices=8)
    assert "data=2, fsdp=2, tensor=2" in str(e.value)  # the closest shape that fits


def test_an_axis_that_cannot_be_inferred_is_named():
    with pytest.raises(MeshError, match="data cannot be inferred: the other axes multiply to 3"):
        resolve_mesh_shape(-1, 3, 1, num_devices=8)


@pytest.mark.parametrize("sizes, message", [
    ((-1, -1, 1), "At most one mesh axis may be -1"),
    ((0, 1, 1), "must be positive"),
    ((2, -4, 1), "must be positive"),
])
def test_invalid_sizes(sizes, message):
    with pytest.raises(MeshError, match=message):
        resolve_mesh_shape(*sizes, num_devices=8)


def test_create_mesh_spans_all_devices_with_named_axes():
    mesh = create_mesh()
    assert mesh.axis_names == MESH_AXES
    assert mesh.devices.size == jax.device_count()


def test_create_mesh_reads_its_sizes_from_gin():
    gin.parse_config(f"create_mesh.fsdp = {jax.device_count() + 1}")
    with pytest.raises(MeshError, match=f"fsdp={jax.device_count() + 1}"):
        create_mesh()


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Just what jax's mesh_utils reads of a device."""

    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "fake"


def hosts_of(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


def test_tensor_stays_inside_a_host_and_data_spans_hosts():
    devices = [FakeDevice(i, process_index=i // 4) for i in range(16)]  # 4 hosts x 4 devices
    hosts = hosts_of(device_grid({"stage": 1, "data": 2, "fsdp": 4, "tensor": 2}, devices))
    assert hosts.shape == (1, 2, 4, 2)
    assert (hosts == hosts[..., :1]).all()  # each tensor group on one host
    assert len(set(hosts[0, :, 0, 0])) == 2  # data crosses hosts
    assert sorted(np.unique(hosts)) == [0, 1, 2, 3]


def test_tensor_wider_than_a_host_is_refused():
    devices = [FakeDevice(i, process_index=i // 4) for i in range(16)]
    with pytest.raises(MeshError, match="tensor=8 must stay inside one host.*4 devices"):
        device_grid({"stage": 1, "data": 1, "fsdp": 2, "tensor": 8}, devices)


def test_pipeline_stages_span_hosts_before_data():
    devices = [FakeDevice(i, process_index=i // 4) for i in range(16)]  # 4 hosts x 4 devices
    hosts = hosts_of(device_grid({"stage": 2, "data": 2, "fsdp": 2, "tensor": 2}, devices))
    assert not set(hosts[0].flat) & set(hosts[1].flat)  # no host holds two stages
    assert (hosts == hosts[..., :1]).all()
