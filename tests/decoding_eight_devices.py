"""Decodes with a tiny BLOOM on 8 simulated CPU devices, or compiles a 7B1-shaped decode for them.

Run as a script in a fresh process (the device count is fixed when jax starts):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/decoding_eight_devices.py parity OUT_DIR
writes OUT_DIR/parity.npz (greedy and sampled outputs on one device, keyed "single/...", and on
each mesh, keyed "DxFxT/...") and OUT_DIR/shardings.json (per mesh, the shape of one device's
shard of the first layer's cached keys, the cache's token mask and two parameters (as put for
decoding: the layers split), read from the arrays);
    python tests/decoding_eight_devices.py plan OUT_DIR
compiles BLOOM-7b1's decode (bfloat16) for a batch on mesh (1, 1, 8) on abstract arrays and
writes OUT_DIR/plan.json (XLA's per-device bytes).
"""

import functools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax import decoding
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning.mesh import create_mesh

MESHES = ((2, 2, 2), (1, 1, 8))  # (data, fsdp, tensor)
CONFIG = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8)
NEW_TOKENS = 10
SAMPLED = dict(temperature=1.0, top_k=40, top_p=0.9, seed=5)
# BLOOM-7b1 served in bfloat16, 8 prompts of 1024 tokens continued by 1024.
PLAN_CONFIG = BloomConfig(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32,
                          dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
PLAN_MESH = (1, 1, 8)
PLAN_BATCH, PLAN_PROMPT, PLAN_NEW = 8, 1024, 1024


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """Three left-padded prompts: a batch no mesh axis divides."""
    rng = np.random.default_rng(0)
    return decoding.left_pad([rng.integers(4, CONFIG.vocab_size, n) for n in (7, 3, 5)],
                             decoding.PAD_ID)


@functools.cache
def params() -> dict:
    """Random weights far larger than BLOOM's init, so that greedy decoding does not just repeat
    the last token (see tests/test_decoding.py). Made once: each run decodes the same ones."""
    init = nn.unbox(BloomForCausalLM(CONFIG).init(jax.random.key(0), jnp.zeros((1, 4), int)))
    leaves, tree = jax.tree.flatten(init["params"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def outputs(mesh) -> dict[str, np.ndarray]:
    ids, mask = prompts()
    run = dict(attention_mask=mask, eos_token_id=None, mesh=mesh)
    return {
        "greedy": decoding.generate_ids(CONFIG, params(), ids, NEW_TOKENS, **run),
        "sampled": decoding.generate_ids(CONFIG, params(), ids, NEW_TOKENS, **SAMPLED, **run),
    }


def shard_shapes(mesh) -> dict[str, list]:
    """The shape of one device's shard of the parameters and the cache of a started decode."""
    run = decoding.generator(CONFIG, mesh)
    laid_out = run.put_params(params())
    ids, mask = prompts()
    state = run.start(decoding.Limits(NEW_TOKENS), laid_out, ids, mask,
                      decoding.row_keys([0] * 3, range(3)), decoding.Sampling().rows(3))
    shard = lambda x: list(x.sharding.shard_shape(x.shape))
    return {"cache_key": shard(state.cache["h"][0]["self_attention"]["key"]),  # layer 0's
            "cache_token_mask": shard(state.cache["token_mask"]),
            "query_key_value": shard(
                laid_out["h"][0]["self_attention"]["query_key_value"]["kernel"]),  # layer 0's
            "word_embeddings": shard(laid_out["word_embeddings"]["embedding"])}


def parity(out_dir: pathlib.Path) -> None:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    arrays = {f"single/{k}": v for k, v in outputs(None).items()}
    layouts = {}
    for shape in MESHES:
        name = "x".join(map(str, shape))
        mesh = create_mesh(*shape)
        arrays.update({f"{name}/{k}": v for k, v in outputs(mesh).items()})
        layouts[name] = shard_shapes(mesh)
    np.savez(out_dir / "parity.npz", **arrays)
    (out_dir / "shardings.json").write_text(json.dumps(layouts))


def plan(out_dir: pathlib.Path) -> None:
    run = decoding.generator(PLAN_CONFIG, create_mesh(*PLAN_MESH))
    compiled = run.compile(decoding.Limits(PLAN_NEW), PLAN_BATCH, PLAN_PROMPT)
    memory = compiled.fn.memory_analysis()
    (out_dir / "plan.json").write_text(json.dumps({
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "peak_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
    }))


if __name__ == "__main__":
    {"parity": parity, "plan": plan}[sys.argv[1]](pathlib.Path(sys.argv[2]))
