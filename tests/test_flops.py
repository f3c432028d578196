"""Parameter counts and FLOPs against BLOOM's published figures (the bigscience/bloom* model
cards; the TFLOPs BigScience's Megatron-DeepSpeed logged, Narayanan et al. 2021 eq. 3)."""

import dataclasses

import pytest

from bloom_jax import flops, model


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden_size: int
    n_layer: int
    n_head: int
    vocab_size: int = 250880
    dtype: str = "float32"


# name: (shape, model-card parameter count, per-token model FLOPs with K=3, worked out by hand
# from Megatron's formula to 3-4 significant digits)
RELEASED = {
    "bloom-560m": (Shape(1024, 24, 16), 559_214_592, 3.57e9),
    "bloom-1b1": (Shape(1536, 24, 16), 1_065_314_304, 6.72e9),
    "bloom-1b7": (Shape(2048, 24, 16), 1_722_408_960, 1.08e10),
    "bloom-3b": (Shape(2560, 30, 32), 3_002_557_440, 1.89e10),
    "bloom-7b1": (Shape(4096, 30, 32), 7_069_016_064, 4.39e10),
    "bloom": (Shape(14336, 70, 112), 176_247_271_424, 1.077e12),
}
BLOOM = RELEASED["bloom"][0]


@pytest.mark.parametrize("name", RELEASED)
def test_param_count_equals_model_card(name):
    shape, params, _ = RELEASED[name]
    assert flops.param_count(shape) == params


@pytest.mark.parametrize("name", RELEASED)
def test_flops_per_token_match_hand_computed_values(name):
    shape, _, per_token = RELEASED[name]
    # The hand-computed values have 3-4 significant digits.
    assert flops.flops_per_token(shape, 2048) == pytest.approx(per_token, rel=3e-3)


def test_flops_per_token_is_close_to_6n_for_176b():
    assert flops.flops_per_token(BLOOM, 2048) / (6 * 176_247_271_424) == pytest.approx(1.019, abs=1e-3)


def test_bigscience_logged_149_tflops_at_iteration_12695():
    # B=2048, s=2048 at 105.22 s/iteration on 384 A100s, with activation recomputation: Megatron
    # logged K = 4 in its formula, i.e. 4/3 of the model FLOPs.
    model_step = flops.flops_per_step(BLOOM, batch_size=2048, seq_len=2048)
    logged = flops.tflops_per_device(4 / 3 * model_step, 105.22, 384)
    assert logged == pytest.approx(149.02, abs=0.01)
    assert flops.tflops_per_device(model_step, 105.22, 384) == pytest.approx(111.8, abs=0.05)


# bloom-1b7 (h = 2048, l = 24) at s = 2048, by hand: model FLOPs per token
# 72 l h^2 (1 + s/(6h) + V/(16 l h)) = 7,247,757,312 x (1 + 1/6 + 250880/786432) = 1.07678e10;
# a layer's forward is 24 h^2 + 4 s h = 100,663,296 + 16,777,216, of which attention's two
# batched matmuls (4 s h) are all that dots_with_no_batch_dims recomputes.
HAND_1B7 = {"none": 1.07678e10, "dots": 1.07678e10,
            "dots_with_no_batch_dims": 1.07678e10 + 24 * 16_777_216,
            "selective": 1.07678e10 + 24 * 16_777_216,
            "full": 1.07678e10 + 24 * (100_663_296 + 16_777_216),
            "layer_inputs": 1.07678e10 + 24 * (100_663_296 + 16_777_216),
            "layer_inputs_offloaded": 1.07678e10 + 24 * (100_663_296 + 16_777_216)}


def test_every_remat_policy_has_its_recomputation_counted():
    assert set(flops.RECOMPUTED_LAYER_FLOPS) == set(model.REMAT_POLICIES) == set(HAND_1B7)


@pytest.mark.parametrize("policy", HAND_1B7)
def test_hardware_flops_count_what_each_remat_policy_recomputes(policy):
    shape = RELEASED["bloom-1b7"][0]
    assert flops.flops_per_token(shape, 2048, policy) == pytest.approx(HAND_1B7[policy], rel=1e-5)


@pytest.mark.parametrize("policy,chunks", [("none", 1), ("full", 1), ("selective", 56)])
def test_a_sliced_loss_adds_the_head_s_forward_to_the_hardware_flops(policy, chunks):
    config = model.BloomConfig(vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16,
                               remat_policy=policy, loss_vocab_chunks=chunks)
    head = 2 * 250880 * 2048 if chunks > 1 else 0  # the logits of every slice, computed again
    assert flops.hardware_flops_per_step(config, 4, 2048) == pytest.approx(
        4 * 2048 * (HAND_1B7[policy] + head), rel=1e-5)


def test_pipeline_bubble_and_stage_transfer_bytes():
    assert flops.pipeline_bubble(1, 8) == 0
    assert flops.pipeline_bubble(4, 8) == pytest.approx(3 / 11)  # GPipe: (S - 1) / (M + S - 1)
    assert flops.pipeline_bubble(4, 8, 3) == pytest.approx(3 / 27)  # circular: (S-1)/(MR+S-1)
    shape = dataclasses.replace(BLOOM, dtype="bfloat16")
    # 8 sequences over data x fsdp = 4: 2 rows of 2048 x 14336 bfloat16 values per device,
    # split over tensor = 8 along the length with sequence parallelism
    mesh = {"data": 2, "fsdp": 2, "tensor": 8}
    assert flops.stage_transfer_bytes(shape, 8, 2048, mesh) == 2 * 2048 * 14336 * 2
    assert flops.stage_transfer_bytes(shape, 8, 2048, mesh, True) == 2 * 256 * 14336 * 2


# BLOOM-176B's step (105.22 s on 384 A100s, 312 TFLOP/s each): MFU and HFU by hand. Model FLOPs
# per token 72 x 70 x 14336^2 x (1 + 2048/86016 + 250880/16056320) = 1.076675e12; recomputed per
# token: full 70 x (24 x 14336^2 + 4 x 2048 x 14336) = 3.534959e11, dots_with_no_batch_dims
# 70 x 4 x 2048 x 14336 = 8.220836e9. FLOP/s available: 105.22 x 384 x 312e12 per step.
BLOOM_STEP_TOKENS, BLOOM_CAPACITY = 2048 * 2048, 105.22 * 384 * 312e12
HAND_176B_HFU = {"none": 1.076675e12, "full": 1.076675e12 + 3.534959e11,
                 "dots_with_no_batch_dims": 1.076675e12 + 8.220836e9}


@pytest.mark.parametrize("policy", HAND_176B_HFU)
def test_mfu_and_hfu_of_bloom_176b_step_by_remat_policy(policy):
    a100 = flops.PEAK_FLOPS["A100"]["bfloat16"]
    model_step = flops.flops_per_step(BLOOM, 2048, 2048)
    hardware_step = flops.flops_per_step(BLOOM, 2048, 2048, policy)
    assert flops.mfu(model_step, 105.22, 384, a100) == pytest.approx(0.358, abs=1e-3)
    hfu = HAND_176B_HFU[policy] * BLOOM_STEP_TOKENS / BLOOM_CAPACITY
    assert flops.mfu(hardware_step, 105.22, 384, a100) == pytest.approx(hfu, rel=1e-5)
    assert hfu == pytest.approx({"none": 0.358, "full": 0.476,
                                 "dots_with_no_batch_dims": 0.361}[policy], abs=1e-3)


@dataclasses.dataclass
class FakeDevice:
    device_kind: str
    platform: str = "gpu"


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
    ("NVIDIA A100-SXM4-80GB", "tfloat32", 156e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),  # dense, not the 1979 sparsity figure
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
])
def test_peak_flops_by_device_kind(kind, dtype, peak):
    assert flops.peak_flops(FakeDevice(kind), dtype) == peak


def test_unknown_device_or_dtype_says_what_to_do():
    with pytest.raises(ValueError, match="no peak FLOP/s known for device kind 'TPU v9'"):
        flops.peak_flops(FakeDevice("TPU v9"))
    with pytest.raises(ValueError, match="no peak for dtype 'int4'"):
        flops.peak_flops(FakeDevice("NVIDIA H100 80GB HBM3"), "int4")


def test_cpu_matmul_peak_is_measured():
    measured = flops.measure_matmul_flops(seconds=0.2, size=256)
    assert 1e8 < measured < 1e13  # a 2-core CPU does ~1e10-1e11 float32 FLOP/s
