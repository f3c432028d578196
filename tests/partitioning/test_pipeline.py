"""Pipeline parallelism over the `stage` mesh axis: on 8 simulated devices the pipelined layer
stack equals the plain one (alone and through the real train step), and checkpoints move between
pipelined and plain layouts.

The 8-device runs happen in one subprocess (tests/partitioning/pipeline_eight_devices.py).
"""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bloom_jax import optim, sharded_step
from bloom_jax.model import BloomConfig
from partitioning.mesh import MeshError
from partitioning.rules import logical_axis_rules, pipeline_rules
from tests.conftest import build_once
from tests.partitioning import pipeline_eight_devices as pipe8
from tests.partitioning.test_shardings import run_on_eight_devices


@pytest.fixture(scope="module")
def pipeline_run(shared_tmp):
    """Runs pipeline_eight_devices.py once (for all workers); returns its arrays and counts."""
    out = build_once(shared_tmp, "pipeline_eight_devices",
                     lambda out: run_on_eight_devices("pipeline_eight_devices.py", out))
    return np.load(out / "results.npz"), json.loads((out / "counts.json").read_text())


def keys(arrays, run: str, prefix: str = "") -> list[str]:
    return [k.removeprefix(f"{run}/") for k in arrays if k.startswith(f"{run}/{prefix}")]


def test_stages_left_without_a_layer_are_refused_naming_the_fix():
    workload = sharded_step.Workload(
        BloomConfig(vocab_size=64, hidden_size=32, n_layer=6, n_head=4), sequence_length=16,
        batch_ramp=optim.BatchRampUp(global_batch_size=8, start=8))
    mesh = jax.sharding.AbstractMesh((4, 1, 1, 1), ("stage", "data", "fsdp", "tensor"))
    with pytest.raises(MeshError, match=re.escape(
            "n_layer=6 layers leave a stage of stage=4 pipeline stages without a layer (padded "
            "to 8 for Workload.pipeline_repeats=1); set create_mesh.stage to at most 6")):
        sharded_step.shard_training(workload, mesh, ())  # 8 padded layers, 2 a stage
    circular = dataclasses.replace(workload, model_config=BloomConfig(
        vocab_size=64, hidden_size=32, n_layer=8, n_head=4), pipeline_repeats=2,
        micro_batch_size=4)
    with pytest.raises(MeshError, match="Workload.pipeline_repeats=2 needs passes of at least "
                       "stage=4 micro-steps, got 2; set Workload.pipeline_micro_steps to at least "
                       "4, or Workload.pipeline_repeats = 1"):
        sharded_step.shard_training(circular, mesh, ())


def test_uneven_stages_shard_the_stored_layers_model_dimension_over_stage():
    rules = pipeline_rules(logical_axis_rules(), n_layer=7, stages=4)
    assert nn.logical_to_mesh_axes(("layers", "embed", "heads"), rules) == P(
        None, ("fsdp", "stage"), "tensor")  # stored: 7 layers do not split over 4 stages
    assert nn.logical_to_mesh_axes(("activation_stage", None, "embed", "heads"), rules) == P(
        "stage", None, "fsdp", "tensor")  # a stage's layers at run time
    assert pipeline_rules(logical_axis_rules(), n_layer=8, stages=4) == logical_axis_rules()
    # rounds: stage s holds every S-th group of layers, not a contiguous block
    assert pipeline_rules(logical_axis_rules(), n_layer=8, stages=4, repeats=2) == rules


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [*pipe8.MESHES, *pipe8.UNEVEN_MESHES])
def test_pipelined_loss_and_gradients_equal_the_single_device_model(pipeline_run, mesh):
    arrays, counts = pipeline_run
    single = "single_uneven" if mesh in pipe8.UNEVEN_MESHES else "single"
    grads = keys(arrays, single, "grads/")
    assert grads and len(grads) == len(keys(arrays, mesh, "grads/"))
    np.testing.assert_allclose(arrays[f"{mesh}/loss"], arrays[f"{single}/loss"], rtol=1e-6)
    for key in grads:
        np.testing.assert_allclose(arrays[f"{mesh}/{key}"], arrays[f"{single}/{key}"],
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    # Each iteration, and once more at the end, a device sends its rows of a micro-batch to the
    # next stage, and as many bytes back in the backward pass: its 1 or 2 rows of 16 float32
    # residuals of 64, over M R + S iterations (4 micro-batches).
    shape, repeats = {**pipe8.MESHES, **pipe8.UNEVEN_MESHES}[mesh]
    rows = pipe8.run8.BATCH // pipe8.MICRO_BATCHES // (shape.get("data", 1) * shape["fsdp"])
    iterations = pipe8.MICRO_BATCHES * repeats + shape["stage"] - 1
    assert counts[mesh] == 2 * (iterations + 1) * rows * pipe8.run8.LENGTH * 64 * 4


@pytest.mark.slow
@pytest.mark.parametrize("layout,plain", [("pipelined", "plain"),
                                          ("pipelined_in_passes", "plain"),
                                          ("uneven_pipelined", "uneven_plain")])
def test_pipelined_train_step_equals_the_plain_one_on_the_same_devices(pipeline_run, layout,
                                                                       plain):
    arrays, _ = pipeline_run
    params = keys(arrays, f"step_{plain}", "params/")
    assert params
    for key in ("loss", "grad_norm", *params):
        np.testing.assert_allclose(arrays[f"step_{layout}/{key}"], arrays[f"step_{plain}/{key}"],
                                   rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["restored_pipelined_on_plain", "restored_plain_on_pipelined"])
def test_checkpoints_restore_across_pipelined_and_plain_layouts(pipeline_run, run):
    arrays, counts = pipeline_run
    params = keys(arrays, run, "params/")
    assert params == keys(arrays, "single", "params/")  # the same tree
    for key in params:  # the initial parameters, whichever layout saved or restored them
        np.testing.assert_array_equal(arrays[f"{run}/{key}"], arrays[f"single/{key}"])
    assert counts[f"{run}_placed"]  # on the restoring layout's shardings
