"""The sharded step: the workload's micro-batch arithmetic, and jitted steps that carry their own
mesh and rules (traced anywhere, they shard the model's activations)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bloom_jax import lora as lora_lib, optim, sharded_step
from bloom_jax.data import packing
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from tests import eight_device_steps
from tests.conftest import build_once

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
             for k, dtype in packing.BATCH_FEATURES.items()}
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


@pytest.mark.slow
def test_weights_gathered_once_per_step_give_the_same_step_with_fewer_gathers(shared_tmp):
    """data=1, fsdp=4, tensor=2 on 8 simulated devices (tests/eight_device_steps.py, run once
    for this test and tests/test_collectives.py), 3 micro-steps: the same loss and parameters
    after the step, and the all-gathers of one micro-step's forward no longer repeat in every
    micro-step's forward, recompute and backward."""
    out = build_once(shared_tmp, "eight_device_steps", eight_device_steps.run_in_fresh_process)
    arrays = np.load(out / "gather_once.npz")
    params = [k.removeprefix("plain/") for k in arrays if k.startswith("plain/params/")]
    assert params and int(arrays["plain/micro_steps"]) == 3
    for key in ["loss", *params]:
        np.testing.assert_array_equal(arrays[f"once/{key}"], arrays[f"plain/{key}"], err_msg=key)
    once, plain = (int(arrays[f"{name}/all_gather_operand_bytes"]) for name in ("once", "plain"))
    assert 0 < once * 3 < plain


@pytest.mark.slow
def test_a_sliced_lm_head_gives_the_whole_heads_loss_and_gradients_on_a_sharded_vocabulary(
        shared_tmp):
    """data=2, fsdp=2, tensor=2 on 8 simulated devices (tests/eight_device_steps.py): the loss
    with the LM head in 4 vocabulary slices, and its gradients, are the whole logits' (the
    embedding's rows sharded over tensor)."""
    out = build_once(shared_tmp, "eight_device_steps", eight_device_steps.run_in_fresh_process)
    arrays = np.load(out / "sliced_loss.npz")
    vocab_axes = {str(arrays[f"{chunks}/embedding_grad_vocab_axis"]) for chunks in (1, 4)}
    assert vocab_axes == {"tensor"}
    np.testing.assert_allclose(arrays["4/loss"], arrays["1/loss"], rtol=1e-6)
    grads = [k.removeprefix("1/") for k in arrays if k.startswith("1/grads/")]
    assert "grads/word_embeddings/embedding" in grads and len(grads) > 10
    for key in grads:  # float32 sums in another order: within 1e-5 of each gradient's scale
        whole = arrays[f"1/{key}"]
        np.testing.assert_allclose(arrays[f"4/{key}"], whole, rtol=1e-5,
                                   atol=1e-5 * np.abs(whole).max(), err_msg=key)


def test_gather_once_is_refused_with_lora():
    with pytest.raises(ValueError, match="gather_weights_once applies to full training"):
        sharded_step.Workload(TINY, sequence_length=16, lora=lora_lib.LoraConfig(),
                              gather_weights_once=True)
