"""Runs a tiny BLOOM pipelined over a `stage` mesh axis on 8 simulated CPU devices, and saves
what it got next to the unpipelined model's numbers.

Run as a script in a fresh process (the device count is fixed when jax starts):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/partitioning/pipeline_eight_devices.py OUT_DIR
It writes OUT_DIR/results.npz, keyed "<run>/<what>":
  - "single/...": loss and gradients of the unpipelined model on one device; "<mesh>/...": the
    same from the pipelined model on that mesh (circular: 2 rounds through 2 stages);
    "single_uneven/..." and "uneven_<mesh>/...": the same for a model of 7 layers, on stages
    that do not divide them;
  - "step_<layout>/...": loss, gradient norm and parameters after one train step
    (`shard_training`) on pipelined (circular in one pass, in two passes, and with uneven
    stages) and unpipelined layouts of the same 8 devices;
  - "restored_<from>_on_<to>/...": the parameters a checkpoint of one layout restores to on the
    other;
and OUT_DIR/counts.json: the bytes a device sends to other stages in each compiled program,
and the shardings of the restored parameters.
"""

import dataclasses
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bloom_jax import checkpoints, collectives, optim, sharded_step
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning.mesh import create_mesh
from partitioning.rules import activation_sharding, logical_axis_rules, pipeline_rules
from partitioning.shardings import batch_sharding, init_params, put_batch
from tests.partitioning import eight_devices as run8

CONFIG = BloomConfig(vocab_size=run8.MODEL.config.vocab_size, hidden_size=64, n_layer=4,
                     n_head=8, remat_policy="selective")
MESHES = {  # the pipelined meshes the loss and gradients are checked on, and their rounds
    "circular_stage2_fsdp2_tensor2": (dict(stage=2, data=1, fsdp=2, tensor=2), 2),
}
# 7 layers: 4 stages run 8, the last stage's second a pass-through (model.padded_layers).
UNEVEN_CONFIG = dataclasses.replace(CONFIG, n_layer=7)
UNEVEN_MESHES = {"uneven_stage4_fsdp2": (dict(stage=4, data=1, fsdp=2), 1)}
MICRO_BATCHES = 4  # of 2 sequences: more micro-batches than stages, and as many
# The train step: the same 8 devices with and without a pipeline, 2 micro-steps of 4 sequences
# (mesh, MICRO_BATCH_SIZE, Workload.pipeline_micro_steps, Workload.pipeline_repeats): through
# the pipeline in one pass of 2 rounds, or in two passes.
LAYOUTS = {
    "pipelined": (CONFIG, dict(stage=2, data=1, fsdp=2, tensor=2), 2, None, 2),
    "pipelined_in_passes": (CONFIG, dict(stage=2, data=1, fsdp=2, tensor=2), 2, 1, 1),
    "plain": (CONFIG, dict(data=1, fsdp=4, tensor=2), 1, None, 1),
    "uneven_pipelined": (UNEVEN_CONFIG, dict(stage=4, data=1, fsdp=2), 2, None, 1),
    "uneven_plain": (UNEVEN_CONFIG, dict(data=1, fsdp=4, tensor=2), 1, None, 1),
}


def micro_batched(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[batch, length] -> [MICRO_BATCHES, batch / MICRO_BATCHES, length]."""
    return {k: v.reshape(MICRO_BATCHES, -1, *v.shape[1:]) for k, v in batch.items()}


def loss_fn(model, params, batch) -> jax.Array:
    """Mean next-token cross-entropy over the scored tokens, of any leading batch shape."""
    logits = model.apply({"params": params}, batch["input_ids"],
                         segment_ids=batch["segment_ids"], positions=batch["positions"])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])
    return jnp.sum(losses * batch["loss_weights"]) / jnp.sum(batch["loss_weights"])


def run_single_device(config: BloomConfig) -> dict[str, np.ndarray]:
    model = BloomForCausalLM(config)
    params = init_params(model, jax.random.key(run8.SEED), jax.ShapeDtypeStruct((1, 1), jnp.int32),
                         mesh=create_mesh(devices=jax.devices()[:1]), rules=logical_axis_rules())
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b)))(
        params, run8.make_batch())
    return run8.as_arrays(params, loss, grads)


def run_pipelined(config: BloomConfig, shape: dict[str, int], repeats: int,
                  ) -> tuple[dict[str, np.ndarray], int]:
    """Loss and gradients of the pipelined model, and the bytes a device sends to other stages
    by the compiled program's permutes."""
    mesh = create_mesh(**shape)
    rules = pipeline_rules(logical_axis_rules(), config.n_layer, shape["stage"], repeats)
    model = BloomForCausalLM(config, stages=shape["stage"], repeats=repeats)
    params = init_params(model, jax.random.key(run8.SEED), jax.ShapeDtypeStruct((1, 1), jnp.int32),
                         mesh=mesh, rules=rules)
    with activation_sharding(mesh, rules):
        batch = put_batch(micro_batched(run8.make_batch()),
                          batch_sharding(mesh, rules, micro_batch_axis=True))
        compiled = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b))).lower(
            params, batch).compile()
        loss, grads = compiled(params, batch)
    permutes = [c for c in collectives.read(compiled.as_text(), dict(mesh.shape), 8)
                if c.kind == "collective-permute" and c.axes == ("stage",)]
    return run8.as_arrays(params, loss, grads), sum(c.wire_bytes * c.count for c in permutes)


def shard_layout(config: BloomConfig, shape: dict[str, int], micro_batch_size: int,
                 pipeline_micro_steps: int | None, pipeline_repeats: int,
                 ) -> sharded_step.ShardedTraining:
    workload = sharded_step.Workload(
        config, sequence_length=run8.LENGTH, micro_batch_size=micro_batch_size,
        batch_ramp=optim.BatchRampUp(global_batch_size=run8.BATCH, start=run8.BATCH),
        pipeline_micro_steps=pipeline_micro_steps, pipeline_repeats=pipeline_repeats)
    return sharded_step.shard_training(workload, create_mesh(**shape), logical_axis_rules())


def run_step(training: sharded_step.ShardedTraining) -> dict[str, np.ndarray]:
    """One train step from the seed's initial state; returns loss, grad norm and parameters."""
    batch = {k: v.reshape(training.micro_steps(run8.BATCH), training.micro_batch, run8.LENGTH)
             for k, v in run8.make_batch().items()}
    state, metrics = training.step(training.init_state(run8.SEED),
                                   put_batch(batch, training.batch_sharding), run8.BATCH)
    arrays = {f"params/{k}": np.asarray(v) for k, v in run8.flat(state.params).items()}
    return {**arrays, "loss": np.asarray(metrics["loss"]),
            "grad_norm": np.asarray(metrics["grad_norm"])}


def restore_across(saved: sharded_step.ShardedTraining, target: sharded_step.ShardedTraining,
                   directory: pathlib.Path) -> tuple[dict[str, np.ndarray], bool]:
    """Saves `saved`'s initial state, restores it onto `target`'s layout; returns the restored
    parameters and whether each landed with `target`'s sharding."""
    checkpointer = checkpoints.TrainCheckpointer(directory, CONFIG)
    checkpointer.save(saved.init_state(run8.SEED), {"position": 0}, force=True)
    checkpointer.close()
    checkpointer = checkpoints.TrainCheckpointer(directory, CONFIG)
    state, _ = checkpointer.restore(target.abstract_state)
    checkpointer.close()
    placed = all(a.sharding == s for a, s in zip(jax.tree.leaves(state),
                                                  jax.tree.leaves(target.state_shardings)))
    return {f"params/{k}": np.asarray(v) for k, v in run8.flat(state.params).items()}, placed


def main(out_dir: pathlib.Path) -> None:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    arrays = {f"single/{k}": v for k, v in run_single_device(CONFIG).items()}
    arrays.update({f"single_uneven/{k}": v for k, v in run_single_device(UNEVEN_CONFIG).items()})
    counts = {}
    for config, meshes in ((CONFIG, MESHES), (UNEVEN_CONFIG, UNEVEN_MESHES)):
        for name, (shape, repeats) in meshes.items():
            mesh_arrays, counts[name] = run_pipelined(config, shape, repeats)
            arrays.update({f"{name}/{k}": v for k, v in mesh_arrays.items()})
    layouts = {name: shard_layout(*layout) for name, layout in LAYOUTS.items()}
    for name, training in layouts.items():
        arrays.update({f"step_{name}/{k}": v for k, v in run_step(training).items()})
    with tempfile.TemporaryDirectory() as tmp:
        for saved, target in (("pipelined", "plain"), ("plain", "pipelined")):
            run = f"restored_{saved}_on_{target}"
            restored, counts[f"{run}_placed"] = restore_across(
                layouts[saved], layouts[target], pathlib.Path(tmp) / run)
            arrays.update({f"{run}/{k}": v for k, v in restored.items()})
    np.savez(out_dir / "results.npz", **arrays)
    (out_dir / "counts.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
