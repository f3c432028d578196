"""What a budget buys: GPU names, BLOOM's MFU, and shapes ranked by a law, shardable."""

import jax
import jax.numpy as jnp
import pytest

from bloom_jax import budget, flops, scaling
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import shardings, validation
from partitioning.mesh import MeshError
from partitioning.rules import logical_axis_rules

MESH = {"stage": 1, "data": 2, "fsdp": 16, "tensor": 8}


def test_gpu_names_of_both_spellings_in_any_case():
    assert budget.gpu("A100") == budget.gpu("a100-80GB") == budget.Gpu("A100", 80.0)
    assert budget.gpu("H100-SXM") == budget.gpu("h100")
    assert budget.gpu("a100-40gb").memory_gib == 40.0
    assert all(gpu.name in flops.PEAK_FLOPS for gpu in budget.GPUS.values())
    with pytest.raises(ValueError, match="unknown GPU 'v100'; use one of a100-40gb, "):
        budget.gpu("v100")


def test_bloom_mfu_is_its_model_tflops_over_the_a100_peak():
    # Reference facts §5: 111.8 model TFLOP/s per A100 of 312 (recomputation: tests/test_flops.py).
    assert budget.BLOOM_MFU == pytest.approx(111.8 / 312, rel=1e-3)


def test_a_million_a100_hours_at_bloom_mfu_pay_for_bloom_176b():
    # BLOOM-176B on 366B tokens took "~1M GPU-hours" (reference facts §3.3).
    bloom_flops = flops.flops_per_token(budget.BLOOM_176B, 2048) * budget.BLOOM_176B_TOKENS
    hours = budget.budget_flops(1e6, budget.gpu("a100-80gb"), budget.BLOOM_MFU)
    assert hours == pytest.approx(bloom_flops, rel=0.1)


def _check_shardable(shape: budget.Shape, mesh_shape: dict[str, int]) -> None:
    model = BloomForCausalLM(BloomConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                                         n_layer=shape.n_layer, n_head=shape.n_head))
    boxed = shardings.abstract_params(model, jax.ShapeDtypeStruct((1, 1), jnp.int32))
    validation.check_mesh(mesh_shape, boxed, logical_axis_rules(), (mesh_shape["data"]
                                                                     * mesh_shape["fsdp"], 2048))


def test_shapes_proposed_are_shardable_on_the_mesh():
    law = scaling.BESIROGLU2024
    candidates = budget.rank_shapes(1e22, law, 2048, heads_multiple=MESH["tensor"],
                                    hidden_multiple=MESH["fsdp"])
    assert len(candidates) == 8
    for candidate in candidates:
        _check_shardable(candidate.shape, MESH)
        assert candidate.params == flops.param_count(candidate.shape)
        assert candidate.shape.head_dim in budget.HEAD_DIMS
    with pytest.raises(MeshError):  # the check can fail: 12 heads on tensor=8
        _check_shardable(budget.Shape(n_layer=2, hidden_size=768, n_head=12), MESH)


def test_ranking_is_by_loss_at_the_tokens_the_budget_pays_for():
    law, budget_flops = scaling.BESIROGLU2024, 1e22
    candidates = budget.rank_shapes(budget_flops, law, 2048, heads_multiple=8, hidden_multiple=128)
    assert [c.loss for c in candidates] == sorted(c.loss for c in candidates)
    best = candidates[0]
    assert best.tokens * flops.flops_per_token(best.shape, 2048) == pytest.approx(budget_flops)
    assert best.loss == pytest.approx(law.loss(best.params, best.tokens))
    optimal_params, optimal_tokens = law.optimum(budget_flops)
    assert best.params == pytest.approx(optimal_params, rel=0.5)
    assert best.loss == pytest.approx(law.loss(optimal_params, optimal_tokens), rel=0.01)


def test_a_budget_too_small_for_bloom_vocabulary_is_refused():
    with pytest.raises(ValueError, match="too small for a model with BLOOM's vocabulary"):
        budget.rank_shapes(1e14, scaling.BESIROGLU2024, 2048, heads_multiple=8,
                           hidden_multiple=128)


def test_laws_table_places_bloom_176b_on_each_law():
    table = budget.format_laws(1e23)
    for law in scaling.LAWS.values():
        assert f"{law.name:14s} predicted loss {law.loss(176_247_271_424, 366e9):.3f}" in table
