"""Divisibility checks: clear errors naming the axis, and proposed meshes that do divide."""

import jax
import jax.numpy as jnp
import pytest

from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning.mesh import MESH_AXES, MeshError, factorizations
from partitioning.rules import logical_axis_rules
from partitioning.shardings import abstract_params, init_params
from partitioning.validation import check_mesh, divisible_meshes, mesh_problems, sharded_axes

RULES = logical_axis_rules()
TINY = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8))
BLOOM_176B = BloomForCausalLM(BloomConfig(
    vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112, dtype="bfloat16",
    param_dtype="bfloat16"))


def shape(data, fsdp, tensor):
    return dict(zip(MESH_AXES, (1, data, fsdp, tensor)))


@pytest.fixture(scope="module")
def tiny_params():
    return abstract_params(TINY, jax.ShapeDtypeStruct((8, 16), jnp.int32))


def test_a_mesh_that_divides_everything_passes(tiny_params):
    check_mesh(shape(2, 2, 2), tiny_params, RULES, batch_shape=(8, 16))


def test_tensor_not_dividing_the_heads_is_named(tiny_params):
    with pytest.raises(MeshError) as e:
        check_mesh(shape(1, 1, 3), tiny_params, RULES)
    message = str(e.value)
    assert "'heads' / 'activation_heads' (size 8, in h/self_attention/" in message
    assert "sharded over tensor=3, which does not divide it" in message
    assert "'mlp'" in message and "'vocab'" in message
    # The batch is not checked here, so pure data parallelism over the 3 devices is proposed.
    assert message.endswith("Meshes of 3 devices that divide every sharded axis: "
                            "(data=3, fsdp=1, tensor=1).")


def test_with_no_mesh_of_the_device_count_the_nearest_counts_are_proposed(tiny_params):
    with pytest.raises(MeshError) as e:
        check_mesh(shape(1, 1, 3), tiny_params, RULES, batch_shape=(8, 16))
    message = str(e.value)
    assert ("3 has the prime factor(s) [3], which no sharded axis size has (2, 8, 64, 256)"
            in message)
    assert ("2 devices (data=1, fsdp=2, tensor=1) and 4 devices (data=1, fsdp=4, tensor=1)"
            in message)


def test_a_batch_the_data_axes_do_not_divide_is_named_with_meshes_that_do(tiny_params):
    with pytest.raises(MeshError) as e:
        check_mesh(shape(16, 1, 1), tiny_params, RULES, batch_shape=(8, 16))
    message = str(e.value)
    assert "'activation_batch' (size 8, in activations) is sharded over data=16 x fsdp=1" in message
    assert ("Meshes of 16 devices that divide every sharded axis: (data=1, fsdp=8, tensor=2)"
            in message)


def test_proposed_meshes_are_exactly_those_that_divide(tiny_params):
    axes = sharded_axes(tiny_params, RULES, batch_shape=(4, 16))
    proposed = divisible_meshes(8, axes)
    assert proposed and all(not mesh_problems(s, axes) for s in proposed)
    rejected = [s for s in factorizations(8) if s not in proposed]
    assert rejected and all(mesh_problems(s, axes) for s in rejected)


def test_bloom_176b_on_384_devices_has_no_dividing_mesh_and_gets_alternatives():
    params = abstract_params(BLOOM_176B, jax.ShapeDtypeStruct((1, 2048), jnp.int32))
    axes = sharded_axes(params, RULES, batch_shape=(128, 2048))
    assert divisible_meshes(384, axes) == []
    with pytest.raises(MeshError) as e:
        check_mesh(shape(3, 128, 1), params, RULES, batch_shape=(128, 2048))
    message = str(e.value)
    assert "is sharded over data=3 x fsdp=128, which does not divide it" in message
    assert "384 has the prime factor(s) [3], which no sharded axis size has" in message
    assert "256 devices (data=1, fsdp=128, tensor=2)" in message
    assert not mesh_problems(shape(1, 128, 2), axes)


def test_sharded_init_refuses_a_bad_mesh_before_compiling():
    mesh = jax.sharding.AbstractMesh((1, 1, 2, 3), MESH_AXES)  # no devices: nothing could compile
    with pytest.raises(MeshError, match="'heads' / 'activation_heads' \\(size 8"):
        init_params(TINY, jax.random.key(0), jax.ShapeDtypeStruct((8, 16), jnp.int32),
                    mesh=mesh, rules=RULES)
