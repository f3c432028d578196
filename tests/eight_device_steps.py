"""Compiles (and runs) tiny BLOOM steps on 8 simulated CPU devices for the collectives and
gather-once tests, and saves what it got; run in a fresh process (the device count is fixed when
jax starts), once for both tests (`run_in_fresh_process`):
    python tests/eight_device_steps.py OUT_DIR
writes OUT_DIR/collectives.json, the collectives (bloom_jax.collectives) of the eval step on
  an FSDP and a tensor-parallel mesh, and of a permute around the 8 devices.
OUT_DIR/gather_once.npz, the state and loss after one train step of 3 micro-steps on
  data=1, fsdp=4, tensor=2 with and without Workload.gather_weights_once, and the all-gather bytes
  of each program,
and OUT_DIR/sliced_loss.npz, the training loss and its gradients on data=2, fsdp=2, tensor=2 (the
  vocabulary sharded over tensor) with the LM head whole and in 4 vocabulary slices.
"""

import dataclasses
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax import collectives, optim, sharded_step
from bloom_jax import step as step_lib
from bloom_jax.data import packing
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning.mesh import create_mesh
from partitioning.rules import activation_sharding, logical_axis_rules
from partitioning.shardings import batch_sharding, init_params, put_batch
from tests import forked_commands

CONFIG = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8)
BATCH, LENGTH = 8, 32


def eval_collectives(shape: dict[str, int]) -> list[dict]:
    mesh, rules = create_mesh(**shape), logical_axis_rules()
    model = BloomForCausalLM(CONFIG)
    evaluation = sharded_step.shard_eval(model, mesh, rules, BATCH, LENGTH)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(sharded_step.boxed_params(model)),
                          sharded_step.param_shardings(model, mesh, rules))
    batch = {k: jax.ShapeDtypeStruct((BATCH, LENGTH), dtype, sharding=evaluation.batch_sharding)
             for k, dtype in packing.BATCH_FEATURES.items()}
    hlo = evaluation.step.lower(params, batch).compile().fn.as_text()
    return [dataclasses.asdict(c) for c in collectives.read(hlo, dict(mesh.shape), 4)]


def permute_collectives() -> list[dict]:
    """Each device sends its [16, 64] float32 block to the next one (a ring of 8)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("stage",))
    ring = [(i, (i + 1) % 8) for i in range(8)]
    step = jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(x, "stage", ring), mesh=mesh,
                                 in_specs=jax.P("stage"), out_specs=jax.P("stage")))
    hlo = step.lower(jax.ShapeDtypeStruct((128, 64), jnp.float32)).compile().as_text()
    return [dataclasses.asdict(c) for c in collectives.read(hlo, {"stage": 8}, 4)]


def random_batch(*rows: int) -> dict[str, np.ndarray]:
    """Random tokens, one document per row: [*rows, LENGTH] features."""
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (*rows, LENGTH + 1))
    batch = {"input_ids": tokens[..., :-1], "targets": tokens[..., 1:],
             "segment_ids": np.ones_like(tokens[..., 1:]),
             "positions": np.broadcast_to(np.arange(LENGTH), tokens[..., 1:].shape),
             "loss_weights": np.ones(tokens[..., 1:].shape)}
    return {k: np.asarray(v, packing.BATCH_FEATURES[k]) for k, v in batch.items()}


def gather_once_run(gather: bool) -> dict[str, np.ndarray]:
    mesh, rules = create_mesh(data=1, fsdp=4, tensor=2), logical_axis_rules()
    workload = sharded_step.Workload(CONFIG, sequence_length=LENGTH, micro_batch_size=1,
                                     batch_ramp=optim.BatchRampUp(global_batch_size=10, start=10),
                                     gather_weights_once=gather)
    training = sharded_step.shard_training(workload, mesh, rules)
    steps = training.micro_steps(workload.batch_size)
    batch = {k: jax.device_put(v, training.batch_sharding)
             for k, v in random_batch(steps, training.micro_batch).items()}
    compiled = training.step.lower(training.abstract_state, batch,
                                   jax.ShapeDtypeStruct((), jnp.int32)).compile()
    state, metrics = compiled(training.init_state(seed=0), batch, jnp.int32(workload.batch_size))
    found = collectives.read(compiled.fn.as_text(), dict(mesh.shape), 8, unknown_trips=steps)
    arrays = {f"params/{jax.tree_util.keystr(p, simple=True, separator='/')}": np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    arrays["loss"] = np.asarray(metrics["loss"])
    arrays["micro_steps"] = np.asarray(steps)
    arrays["all_gather_operand_bytes"] = np.asarray(
        collectives.operand_bytes_by_kind(found).get("all-gather", 0))
    return arrays


def sliced_loss_run(chunks: int) -> dict[str, np.ndarray]:
    """The training loss (`step.loss_sums`) and its gradients with the LM head in `chunks`
    vocabulary slices, on data=2, fsdp=2, tensor=2: the embedding's rows sharded over tensor."""
    mesh, rules = create_mesh(data=2, fsdp=2, tensor=2), logical_axis_rules()
    model = BloomForCausalLM(dataclasses.replace(CONFIG, loss_vocab_chunks=chunks))
    ids = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
    params = init_params(model, jax.random.key(0), ids, mesh=mesh, rules=rules)
    batch = put_batch(random_batch(BATCH), batch_sharding(mesh, rules))
    with activation_sharding(mesh, rules):
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p, b: step_lib.loss_sums(model, p, b)[0]))(params, batch)
    arrays = {f"grads/{jax.tree_util.keystr(p, simple=True, separator='/')}": np.asarray(g)
              for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    arrays["loss"] = np.asarray(loss)
    arrays["embedding_grad_vocab_axis"] = np.asarray(
        grads["word_embeddings"]["embedding"].sharding.spec[0])
    return arrays


def main(out_dir: pathlib.Path) -> None:
    found = {"fsdp": eval_collectives({"data": 1, "fsdp": 8, "tensor": 1}),
             "tensor": eval_collectives({"data": 1, "fsdp": 1, "tensor": 8}),
             "permute": permute_collectives()}
    (out_dir / "collectives.json").write_text(json.dumps(found))
    arrays = {f"{name}/{k}": v for name, gather in (("plain", False), ("once", True))
              for k, v in gather_once_run(gather).items()}
    np.savez(out_dir / "gather_once.npz", **arrays)
    np.savez(out_dir / "sliced_loss.npz", **{f"{chunks}/{k}": v for chunks in (1, 4)
                                              for k, v in sliced_loss_run(chunks).items()})


def run_in_fresh_process(out_dir: pathlib.Path) -> None:
    """Runs this script on `out_dir` in a process of its own (the tests keep their own devices;
    forked: tests/forked_commands.py)."""
    result = forked_commands.run([__file__, str(out_dir)], timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]


if __name__ == "__main__":
    # Set before jax starts its backend; a test that imports this module for its constants keeps
    # its own devices.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    main(pathlib.Path(sys.argv[1]))
