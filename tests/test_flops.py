"""Parameter counts and FLOPs against BLOOM's published figures (the bigscience/bloom* model
cards; the TFLOPs BigScience's Megatron-DeepSpeed logged, Narayanan et al. 2021 eq. 3)."""

import dataclasses

import pytest

from bloom_jax import flops


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden_size: int
    n_layer: int
    n_head: int
    vocab_size: int = 250880


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
    # B=2048, s=2048 at 105.22 s/iteration on 384 A100s, with activation recomputation (K=4).
    step = flops.flops_per_step(BLOOM, batch_size=2048, seq_len=2048, recompute=True)
    assert flops.tflops_per_device(step, 105.22, 384) == pytest.approx(149.02, abs=0.01)
    model_step = flops.flops_per_step(BLOOM, batch_size=2048, seq_len=2048)
    assert flops.tflops_per_device(model_step, 105.22, 384) == pytest.approx(111.8, abs=0.05)
    a100 = flops.PEAK_FLOPS["A100"]["bfloat16"]
    assert flops.mfu(model_step, 105.22, 384, a100) == pytest.approx(0.358, abs=1e-3)
    assert flops.mfu(step, 105.22, 384, a100) == pytest.approx(0.478, abs=1e-3)


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
