"""Collectives read from compiled HLO equal a hand count, for FSDP, tensor parallelism and a
permute; compiled on 8 simulated devices in a subprocess (tests/eight_device_steps.py), nodes of
4 devices."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bloom_jax import collectives
from bloom_jax.model import BloomForCausalLM
from partitioning.shardings import abstract_params
from tests import eight_device_steps as run8
from tests.conftest import build_once

B, S, H, L = run8.BATCH, run8.LENGTH, run8.CONFIG.hidden_size, run8.CONFIG.n_layer


@pytest.fixture(scope="module")
def found(shared_tmp):
    """The collectives of each program (compiled once for all workers, and for
    tests/test_sharded_step.py)."""
    out = build_once(shared_tmp, "eight_device_steps", run8.run_in_fresh_process)
    return {name: [collectives.Collective(**{**c, "axes": tuple(c["axes"])}) for c in found]
            for name, found in json.loads((out / "collectives.json").read_text()).items()}


def fsdp_sharded_bytes() -> int:
    """float32 bytes of every parameter with an "embed" axis (the one `fsdp` shards)."""
    boxes = jax.tree.leaves(abstract_params(BloomForCausalLM(run8.CONFIG),
                                            jax.ShapeDtypeStruct((1, 1), jnp.int32)),
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return sum(4 * math.prod(b.value.shape) for b in boxes if "embed" in b.names)


@pytest.mark.slow
def test_fsdp_forward_gathers_each_sharded_parameter_once(found):
    """Each fsdp-sharded parameter is all-gathered once per forward (a layer's inside the layer
    loop, once per trip), and the token ids once for the embedding lookup."""
    gathers = [c for c in found["fsdp"] if c.kind == "all-gather"]
    assert {c.axes for c in gathers} == {("fsdp",)} and {c.group_size for c in gathers} == {8}
    ids = B // 8 * S * 4
    assert sum(c.operand_bytes * c.count for c in gathers) == fsdp_sharded_bytes() // 8 + ids
    assert sum(c.wire_bytes * c.count for c in gathers) == 7 * (fsdp_sharded_bytes() // 8 + ids)
    assert {c.count for c in gathers} == {1, L}
    assert {c.link for c in found["fsdp"]} == {"network"}  # 8 devices over 2 nodes of 4


@pytest.mark.slow
def test_tensor_parallel_forward_all_reduces_its_activations(found):
    """Per layer, attention's and the MLP's outputs; the vocabulary-sharded embedding lookup;
    and the loss's three [batch, length] reductions over the vocabulary-sharded logits."""
    assert {c.kind for c in found["tensor"]} == {"all-reduce"}
    assert sum(c.operand_bytes * c.count for c in found["tensor"]) == (
        (2 * L + 1) * B * S * H * 4 + 3 * B * S * 4)
    assert {c.axes for c in found["tensor"]} == {("tensor",)}


@pytest.mark.slow
def test_a_permute_sends_its_operand_once(found):
    # Pipeline stages (a `stage` mesh axis) move activations by such permutes: their hand count
    # per step (micro-batches x stage boundaries x activation bytes) goes here with the pipeline.
    (permute,) = found["permute"]
    assert permute.kind == "collective-permute" and permute.axes == ("stage",)
    assert permute.operand_bytes == permute.wire_bytes == 16 * 64 * 4
    assert permute.link == "network"


def test_replica_group_formats_and_reduce_scatter_from_sliced_all_reduce():
    hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %g = f32[64]{0} all-gather(%x), replica_groups=[1,8]<=[8], dimensions={0}
  %r = f32[64]{0} all-reduce(%g), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  %d = f32[8]{0} dynamic-slice(%r, %i), dynamic_slice_sizes={8}
  ROOT %t = (s32[], f32[8]) tuple(%i, %d)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (e: (s32[], f32[8])) -> (s32[], f32[8]) {
  %e = (s32[], f32[8]) parameter(0)
  %w = (s32[], f32[8]) while(%e), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %u = (s32[], f32[8]) while(%w), condition=%cond, body=%body
  %y = f32[8]{0} get-tuple-element(%w), index=1
  ROOT %z = f32[8]{0} all-reduce(%y), replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
}
"""
    # %body runs 5 times in the first loop and, its trip count unknown to XLA, 3 in the second.
    gather, scatter, reduce = collectives.read(hlo, {"data": 2, "fsdp": 4}, devices_per_node=4,
                                               unknown_trips=3)
    assert (gather.kind, gather.count, gather.operand_bytes, gather.wire_bytes) == (
        "all-gather", 8, 32, 7 * 32)
    assert gather.axes == ("data", "fsdp") and gather.link == "network"
    assert (scatter.kind, scatter.count, scatter.group_size, scatter.axes, scatter.link) == (
        "reduce-scatter", 8, 4, ("fsdp",), "nvlink")
    assert scatter.wire_bytes == 256 * 3 / 4
    assert (reduce.kind, reduce.axes, reduce.link, reduce.wire_bytes) == (
        "all-reduce", ("data",), "network", 2 * 32 / 2)
    assert collectives.wire_bytes_by([gather, scatter, reduce]) == {
        "network": 8 * 7 * 32 + 32, "nvlink": 8 * 192}
