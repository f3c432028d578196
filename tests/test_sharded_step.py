"""The sharded step: the workload's micro-batch arithmetic, and jitted steps that carry their own
mesh and rules (traced anywhere, they shard the model's activations)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from bloom_jax import optim, sharded_step
from bloom_jax.data import pipeline
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib

TINY = BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)


def workload(batch_size=8, micro_batch_size=None, sequence_length=16):
    return sharded_step.Workload(
        TINY, sequence_length=sequence_length, micro_batch_size=micro_batch_size,
        batch_ramp=optim.BatchRampUp(global_batch_size=batch_size, start=batch_size))


def test_micro_batches_are_per_data_parallel_device_and_the_last_is_padded():
    mesh = jax.sharding.AbstractMesh((1, 3, 32, 4), mesh_lib.MESH_AXES)
    bloom = workload(batch_size=2048, micro_batch_size=1)
    assert bloom.micro_batch(mesh) == 96
    assert sharded_step.micro_steps(2048, 96) == 22  # 2112 rows, the last 64 masked
    assert workload(batch_size=2048).micro_batch(mesh) == 2048  # None: the whole batch
    assert bloom.tokens == 2048 * 16


def test_pipeline_passes_round_the_micro_steps_up_to_whole_passes():
    mesh = jax.sharding.AbstractMesh((2, 1, 4, 1), mesh_lib.MESH_AXES)
    passes = dataclasses.replace(workload(batch_size=40, micro_batch_size=2),
                                 pipeline_micro_steps=2)
    training = sharded_step.shard_training(passes, mesh, rules_lib.DEFAULT_RULES)
    assert training.micro_batch == 8 and training.pipeline_pass(40) == 2
    assert training.micro_steps(40) == 6  # 5 micro-steps of 8 sequences, in passes of 2
    whole = sharded_step.shard_training(workload(batch_size=40, micro_batch_size=2), mesh,
                                        rules_lib.DEFAULT_RULES)
    assert whole.pipeline_pass(40) == whole.micro_steps(40) == 5  # one pass of them all


def test_the_step_traces_with_its_own_rules_outside_any_context():
    """The activation constraints (`nn.with_logical_constraint`) appear in the lowered step only
    when the rules are in force; the MeshFunction brings them, the bare jit does not."""
    mesh = mesh_lib.create_mesh(devices=jax.devices()[:1])
    training = sharded_step.shard_training(workload(), mesh, rules_lib.logical_axis_rules())
    steps = training.micro_steps(8)
    batch = {k: jax.ShapeDtypeStruct((steps, training.micro_batch, 16), dtype,
                                     sharding=training.batch_sharding)
             for k, dtype in pipeline.BATCH_FEATURES.items()}
    args = (training.abstract_state, batch, jax.ShapeDtypeStruct((), jnp.int32))
    carried = training.step.lower(*args).as_text()
    bare = training.step.fn.lower(*args).as_text()
    assert carried.count("sharding_constraint") > 0 == bare.count("sharding_constraint")


def test_an_eval_batch_the_mesh_does_not_divide_is_refused_before_compiling():
    mesh = jax.sharding.AbstractMesh((1, 2, 2, 2), mesh_lib.MESH_AXES)
    model = BloomForCausalLM(TINY)
    sharded_step.shard_eval(model, mesh, rules_lib.DEFAULT_RULES, 8, 32)
    with pytest.raises(mesh_lib.MeshError, match=r"6 sequences.*data=2 x fsdp=2"):
        sharded_step.shard_eval(model, mesh, rules_lib.DEFAULT_RULES, 6, 32)
