"""Parameter count, FLOPs per token and MFU: the one formula the planner, benchmark and trainer share.

Model FLOPs follow Megatron-LM as BigScience logged them for BLOOM (megatron/training.py of
bigscience-workshop/Megatron-DeepSpeed; Narayanan et al. 2021, arXiv:2104.04473, eq. 3):
    F = 24 K B s l h^2 (1 + s / (6 h) + V / (16 l h))   per iteration, K = 3 (forward + backward).
MFU is model FLOPs over peak, whatever is recomputed. Hardware FLOPs (HFU) add the forward FLOPs
the remat policy computes again in the backward pass (RECOMPUTED_LAYER_FLOPS; a sliced loss adds
the LM head's forward: `hardware_flops_per_step`), where Megatron counted K = 4 for any
recomputation (BLOOM's logged ~150 TFLOP/s per A100). LayerNorm, GELU, softmax and the ALiBi adds
are not counted. The config is duck-typed so this module stays light.
"""

import functools
import time
from typing import Protocol

import jax
import jax.numpy as jnp


class ModelShape(Protocol):
    """The fields of `BloomConfig` this module reads."""

    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int


class TrainShape(ModelShape, Protocol):
    """The fields of `BloomConfig` the hardware FLOPs read besides the shape."""

    remat_policy: str
    loss_vocab_chunks: int


# Dense (not sparsity) peak FLOP/s per device, from NVIDIA's data sheets. "float32" is the plain
# CUDA-core rate; XLA's default float32 matmul precision on these GPUs uses TF32 tensor cores.
PEAK_FLOPS = {
    "A100": {"bfloat16": 312e12, "tfloat32": 156e12, "float32": 19.5e12},
    "H100-SXM": {"bfloat16": 989e12, "tfloat32": 494.5e12, "float32": 66.9e12},
    "H100-PCIe": {"bfloat16": 756e12, "tfloat32": 378e12, "float32": 51.2e12},
    "H200": {"bfloat16": 989e12, "tfloat32": 494.5e12, "float32": 66.9e12},
}
# jax `device_kind` substrings (first match wins), e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3".
_DEVICE_KINDS = (("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-SXM"), ("A100", "A100"))


def param_count(config: ModelShape) -> int:
    """Exact parameter count: V h + 2h (embedding + its LN) + L (12 h^2 + 13 h) + 2h (ln_f)."""
    h, layers = config.hidden_size, config.n_layer
    return config.vocab_size * h + 2 * h + layers * (12 * h * h + 13 * h) + 2 * h


# Forward FLOPs per token of one layer that each remat policy (model.REMAT_POLICIES) computes
# again in the backward pass, from hidden size h and sequence length s. A layer's forward is
# 24 h^2 (projections and MLP) + 4 s h (attention's two batched matmuls, over all s keys as
# Megatron counts them). "dots_with_no_batch_dims" saves the weight matmuls and recomputes
# attention's, and so does "selective" (it keeps the matmuls' inputs instead); "dots" saves
# every matmul; none of them counts the recomputed elementwise work. "layer_inputs" (and its
# offloaded variant) keeps only each layer's input: it recomputes the whole forward, as "full"
# does.
RECOMPUTED_LAYER_FLOPS = {
    "none": lambda h, s: 0,
    "full": lambda h, s: 24 * h * h + 4 * s * h,
    "layer_inputs": lambda h, s: 24 * h * h + 4 * s * h,
    "layer_inputs_offloaded": lambda h, s: 24 * h * h + 4 * s * h,
    "dots": lambda h, s: 0,
    "dots_with_no_batch_dims": lambda h, s: 4 * s * h,
    "selective": lambda h, s: 4 * s * h,
}


def flops_per_token(config: ModelShape, seq_len: int, remat_policy: str = "none") -> float:
    """Training FLOPs per token: Megatron's model FLOPs (K = 3), plus the forward FLOPs that
    `remat_policy` recomputes ("none": model FLOPs; any other: hardware FLOPs)."""
    h, layers, vocab = config.hidden_size, config.n_layer, config.vocab_size
    model = 72 * layers * h * h * (1 + seq_len / (6 * h) + vocab / (16 * layers * h))
    return model + layers * RECOMPUTED_LAYER_FLOPS[remat_policy](h, seq_len)


def flops_per_step(config: ModelShape, batch_size: int, seq_len: int,
                   remat_policy: str = "none") -> float:
    """Training FLOPs of one optimizer step over `batch_size` sequences of `seq_len` tokens
    (model FLOPs, plus `remat_policy`'s recomputation)."""
    return flops_per_token(config, seq_len, remat_policy) * batch_size * seq_len


def hardware_flops_per_step(config: TrainShape, batch_size: int, seq_len: int) -> float:
    """The FLOPs a step of `config` computes (HFU's): model FLOPs, the forward FLOPs its
    `remat_policy` recomputes, and with `loss_vocab_chunks` > 1 the LM head's forward once more
    (2 V h per token: the sliced loss computes each slice's logits again, lm_head.py)."""
    head = 2 * config.vocab_size * config.hidden_size if config.loss_vocab_chunks > 1 else 0
    return (flops_per_token(config, seq_len, config.remat_policy) + head) * batch_size * seq_len


def pipeline_bubble(stages: int, micro_steps: int, repeats: int = 1) -> float:
    """The share of a pipelined step each stage idles: `model.pipelined_layers` runs M
    micro-steps in M R + S - 1 iterations of 1 / R of a stage's layers, S - 1 of them idle per
    stage (GPipe's schedule when R = 1)."""
    return (stages - 1) / (micro_steps * repeats + stages - 1)


def stage_transfer_bytes(config: ModelShape, micro_batch: int, seq_len: int,
                         mesh: dict[str, int], sequence_parallel: bool = False) -> int:
    """Bytes one device sends to the next pipeline stage per iteration in the forward pass (the
    backward pass sends as many back): its rows of the micro-batch's [micro_batch, seq_len,
    hidden] residual stream, in the compute dtype (`config.dtype`), split over `tensor` with
    sequence parallelism."""
    rows = micro_batch // (mesh.get("data", 1) * mesh.get("fsdp", 1))
    split = mesh.get("tensor", 1) if sequence_parallel else 1
    return rows * seq_len * config.hidden_size * jnp.dtype(config.dtype).itemsize // split


def tflops_per_device(step_flops: float, step_time_s: float, num_devices: int) -> float:
    """Achieved TFLOP/s per device, as BigScience logged it."""
    return step_flops / (step_time_s * num_devices * 1e12)


def mfu(step_flops: float, step_time_s: float, num_devices: int, peak_flops: float) -> float:
    """Fraction of the devices' peak FLOP/s reached: MFU from model FLOPs, HFU from hardware
    FLOPs."""
    return step_flops / (step_time_s * num_devices * peak_flops)


def peak_flops(device: jax.Device | None = None, dtype: str = "bfloat16") -> float:
    """Peak dense FLOP/s of a device for a compute dtype; measured once for CPUs."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_flops()
    for substring, name in _DEVICE_KINDS:
        if substring in device.device_kind:
            if dtype not in PEAK_FLOPS[name]:
                raise ValueError(f"no peak for dtype {dtype!r}; use one of {sorted(PEAK_FLOPS[name])}.")
            return PEAK_FLOPS[name][dtype]
    raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; add it to "
                     f"bloom_jax.flops.PEAK_FLOPS (known: {sorted(PEAK_FLOPS)}) or pass the peak.")


@functools.cache
def measure_matmul_flops(seconds: float = 1.0, size: int = 1024) -> float:
    """FLOP/s of the fastest of jitted float32 [size, size] matmuls on the default device, timed
    one by one for ~`seconds`.

    Stands in for a CPU's peak, which no table can give. The fastest call, not the mean: load from
    other tenants only ever slows a call, and a mean taken in a busy second read 98 GFLOP/s on a
    CPU that does 170-200 (bench printed an MFU of 1.03 for a 560M step). Cached: it runs once
    per process.
    """
    x = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()  # compile outside the timing
    fastest, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        call_start = time.perf_counter()
        matmul(x).block_until_ready()
        fastest = min(fastest, time.perf_counter() - call_start)
    return 2 * size**3 / fastest
