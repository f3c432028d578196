"""Runs a tiny BLOOM on 8 simulated CPU devices, once per test mesh, and saves what it got.

Run as a script in a fresh process (the device count is fixed when jax starts, so the rest of
the suite keeps its one device):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/partitioning/eight_devices.py OUT_DIR
It writes OUT_DIR/results.npz (loss, parameters and gradients per mesh, keyed "mesh/path", and
the same computed unsharded on one device, keyed "single/path") and OUT_DIR/shardings.json (each
parameter's mesh shape and PartitionSpec, read back from the arrays, and the kinds of collective
the step runs over `tensor`). Meshes in SP_MESHES run again with sequence parallelism, keyed
"mesh+sp".
The shared pieces (model, batch, loss) are imported by the tests that check those files.
"""

import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bloom_jax import collectives
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning.mesh import create_mesh
from partitioning.rules import logical_axis_rules, activation_sharding
from partitioning.shardings import batch_sharding, init_params, put_batch

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2))  # (data, fsdp, tensor)
SP_MESHES = ((2, 2, 2), (1, 4, 2))
MODEL = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8))
BATCH, LENGTH = 8, 16
SEED = 0


def make_batch() -> dict[str, np.ndarray]:
    """Two packed documents per row, the second padded at the end."""
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, MODEL.config.vocab_size, (BATCH, LENGTH + 1), dtype=np.int32)
    split = rng.integers(3, LENGTH - 3, BATCH)
    column = np.arange(LENGTH)
    segment_ids = np.where(column < split[:, None], 1, 2).astype(np.int32)
    segment_ids[:, -2:] = 0
    positions = np.where(segment_ids == 1, column, column - split[:, None]).astype(np.int32)
    return {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions * (segment_ids != 0),
        "loss_weights": (segment_ids != 0).astype(np.float32),
    }


def loss_fn(params, batch) -> jax.Array:
    """Mean next-token cross-entropy over the scored tokens."""
    logits = MODEL.apply(
        {"params": params}, batch["input_ids"],
        segment_ids=batch["segment_ids"], positions=batch["positions"])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])
    return jnp.sum(losses * batch["loss_weights"]) / jnp.sum(batch["loss_weights"])


def mesh_name(shape: tuple[int, int, int], sequence_parallel: bool = False) -> str:
    return "x".join(map(str, shape)) + ("+sp" if sequence_parallel else "")


def flat(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def as_arrays(params, loss, grads) -> dict[str, np.ndarray]:
    arrays = {"loss": np.asarray(loss)}
    arrays.update({f"params/{k}": np.asarray(v) for k, v in flat(params).items()})
    arrays.update({f"grads/{k}": np.asarray(v) for k, v in flat(grads).items()})
    return arrays


def run_single_device() -> dict[str, np.ndarray]:
    """The reference: plain init and step on one device, no mesh, no rules."""
    variables = MODEL.init(jax.random.key(SEED), jnp.zeros((BATCH, LENGTH), jnp.int32))
    params = jax.device_put(nn.unbox(variables["params"]), jax.devices()[0])
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, make_batch())
    assert all(len(g.devices()) == 1 for g in jax.tree.leaves(grads))
    return as_arrays(params, loss, grads)


def run_mesh(shape: tuple[int, int, int], sequence_parallel: bool = False,
             ) -> tuple[dict[str, np.ndarray], dict]:
    mesh = create_mesh(*shape)
    rules = logical_axis_rules(sequence_parallel=sequence_parallel)
    ids = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
    params = init_params(MODEL, jax.random.key(SEED), ids, mesh=mesh, rules=rules)
    shardings = {path: {"mesh": dict(p.sharding.mesh.shape), "spec": list(p.sharding.spec)}
                 for path, p in flat(params).items()}
    with activation_sharding(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss_fn),
                       out_shardings=(None, jax.tree.map(lambda p: p.sharding, params)))
        batch = put_batch(make_batch(), batch_sharding(mesh, rules))
        lowered = step.lower(params, batch)
        compiled = lowered.compile()
        loss, grads = compiled(params, batch)
    shardings["constraints_in_step"] = lowered.as_text().count("sharding_constraint")
    shardings["tensor_collectives"] = sorted({
        c.kind for c in collectives.read(compiled.as_text(), dict(mesh.shape), 8)
        if c.axes == ("tensor",)})
    return as_arrays(params, loss, grads), shardings


def main(out_dir: pathlib.Path) -> None:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    arrays = {f"single/{k}": v for k, v in run_single_device().items()}
    shardings = {}
    runs = [(shape, False) for shape in MESHES] + [(shape, True) for shape in SP_MESHES]
    for shape, sequence_parallel in runs:
        name = mesh_name(shape, sequence_parallel)
        mesh_arrays, shardings[name] = run_mesh(shape, sequence_parallel)
        arrays.update({f"{name}/{k}": v for k, v in mesh_arrays.items()})
    np.savez(out_dir / "results.npz", **arrays)
    (out_dir / "shardings.json").write_text(json.dumps(shardings))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
