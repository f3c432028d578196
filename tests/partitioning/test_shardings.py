"""Shardings from the rules, and a tiny BLOOM trained one step on 8 simulated devices.

The 8-device runs happen in one subprocess (tests/partitioning/eight_devices.py), which also
computes the unsharded reference on one of its devices; this process keeps its single device.
"""

import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bloom_jax.optim import make_optimizer
from partitioning.mesh import create_mesh, resolve_mesh_shape
from partitioning.rules import logical_axis_rules
from partitioning.shardings import (
    abstract_params, batch_sharding, optimizer_shardings, logical_shardings)
from tests import forked_commands
from tests.conftest import build_once, xla_flags
from tests.partitioning import eight_devices as run8

RULES = logical_axis_rules()
MESH_IDS = [run8.mesh_name(shape) for shape in run8.MESHES]
XLA_FLAGS = xla_flags(devices=8)


@pytest.fixture(scope="module")
def abstract():
    return abstract_params(run8.MODEL, jax.ShapeDtypeStruct((run8.BATCH, run8.LENGTH), jnp.int32))


def test_parameter_shardings_follow_the_rules(abstract):
    shardings = logical_shardings(abstract, create_mesh(), RULES)
    specs = {path: s.spec for path, s in run8.flat(shardings).items()}
    assert specs["word_embeddings/embedding"] == P("tensor", "fsdp")  # [vocab, embed]
    assert specs["h/self_attention/query_key_value/kernel"] == P(
        "stage", "fsdp", "tensor", None, None)
    assert specs["h/self_attention/dense/kernel"] == P("stage", "tensor", None, "fsdp")
    assert specs["h/mlp/dense_4h_to_h/kernel"] == P("stage", "tensor", "fsdp")
    assert specs["ln_f/scale"] == P("fsdp")


def test_adam_moments_are_sharded_like_parameters_and_the_rest_replicated(abstract):
    mesh = create_mesh()
    optimizer = make_optimizer()  # BLOOM's: clipping, Adam, masked weight decay, token schedule
    shardings = optimizer_shardings(optimizer, abstract, mesh, RULES)
    state = jax.eval_shape(optimizer.init, nn.unbox(abstract))
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    adam = shardings[2]
    expected = logical_shardings(abstract, mesh, RULES)
    assert adam.mu == expected and adam.nu == expected
    others = [s for s in jax.tree.leaves((shardings[:2], shardings[3:], adam.count))]
    assert others and all(s.spec == P() for s in others)


def test_batches_are_split_over_data_and_fsdp():
    assert batch_sharding(create_mesh(), RULES).spec == P(("data", "fsdp"), None)
    stacked = batch_sharding(create_mesh(), RULES, micro_batch_axis=True)
    assert stacked.spec == P(None, ("data", "fsdp"), None)


def run_on_eight_devices(script: str, out: pathlib.Path) -> pathlib.Path:
    """Runs tests/partitioning/`script` OUT in a process with 8 simulated devices (forked:
    tests/forked_commands.py); returns OUT."""
    result = forked_commands.run([f"tests/partitioning/{script}", str(out)],
                                 env=dict(os.environ, XLA_FLAGS=XLA_FLAGS), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def eight_device_run(shared_tmp):
    """Runs eight_devices.py once (for all workers); returns its arrays and read-back
    shardings."""
    out = build_once(shared_tmp, "shardings_eight_devices",
                     lambda out: run_on_eight_devices("eight_devices.py", out))
    return np.load(out / "results.npz"), json.loads((out / "shardings.json").read_text())


def normalized(spec) -> tuple:
    """A PartitionSpec (or its JSON list) as a tuple of tuples, trailing Nones dropped."""
    axes = [tuple(a) if isinstance(a, (list, tuple)) else a for a in spec]
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_IDS)
def test_every_parameter_is_sharded_as_the_rules_say(eight_device_run, abstract, mesh):
    _, shardings = eight_device_run
    boxes = dict(jax.tree_util.tree_leaves_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    expected_mesh = resolve_mesh_shape(*map(int, mesh.split("x")), num_devices=8)
    assert len(boxes) == len(run8.flat(nn.unbox(abstract)))
    for path, box in boxes.items():
        read_back = shardings[mesh][jax.tree_util.keystr(path, simple=True, separator="/")]
        assert read_back["mesh"] == expected_mesh
        expected = nn.logical_to_mesh_axes(box.names, RULES)
        assert normalized(read_back["spec"]) == normalized(expected)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_IDS)
def test_sharded_step_equals_single_device_step(eight_device_run, abstract, mesh):
    arrays, shardings = eight_device_run
    single = {k.removeprefix("single/"): v for k, v in arrays.items() if k.startswith("single/")}
    assert len(single) == 1 + 2 * len(run8.flat(nn.unbox(abstract)))  # loss, params, grads
    for key, expected in single.items():  # init draws the same numbers, sharded or not
        tolerance = dict(rtol=1e-5, atol=1e-6) if key.startswith("grads/") else dict(rtol=1e-6)
        np.testing.assert_allclose(arrays[f"{mesh}/{key}"], expected, err_msg=key, **tolerance)
    assert shardings[mesh]["constraints_in_step"] > 0  # the model's activation constraints


@pytest.mark.slow
@pytest.mark.parametrize("shape", run8.SP_MESHES, ids=run8.mesh_name)
def test_sequence_parallel_step_equals_the_step_without_it(eight_device_run, abstract, shape):
    """Same loss and gradients to float32 rounding, while the residual stream's all-reduces over
    `tensor` become all-gathers and reduce-scatters."""
    arrays, shardings = eight_device_run
    plain, sp = run8.mesh_name(shape), run8.mesh_name(shape, sequence_parallel=True)
    keys = [k.removeprefix(f"{plain}/") for k in arrays if k.startswith(f"{plain}/")]
    assert len(keys) == 1 + 2 * len(run8.flat(nn.unbox(abstract)))
    for key in keys:
        np.testing.assert_allclose(arrays[f"{sp}/{key}"], arrays[f"{plain}/{key}"], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    assert {"all-gather", "reduce-scatter"} <= set(shardings[sp]["tensor_collectives"])
    assert "reduce-scatter" not in shardings[plain]["tensor_collectives"]
