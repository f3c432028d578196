"""What a compute budget buys: GPU types, BLOOM's measured MFU, a budget in FLOPs, and the BLOOM
shapes near a scaling law's optimum ranked by the loss the law predicts for them.

A shape is trained on the tokens its budget pays for at its own FLOPs per token (flops.py's
Megatron formula, model FLOPs: attention scores and the 250,880-row logits included), so two
shapes of one parameter count can differ in tokens; the laws' own optimum assumes C = 6 N D.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

from bloom_jax import flops, metrics, scaling

VOCAB_SIZE = 250880  # BLOOM's padded vocabulary (reference facts §2)
# BLOOM's sizes use 64, 80, 96 and 128; multiples of 64 suit tensor cores. A width that both
# divide gets 128 (BLOOM-176B's), the first listed: the laws do not tell heads apart.
HEAD_DIMS = (128, 64)
# hidden / layers: BLOOM's six sizes span 43 (560m) to 205 (176B); Kaplan et al. 2020 (§3.1)
# find the loss changes by a few percent only over a wide range of such shapes.
ASPECT_RATIOS = (32, 256)
MIN_LAYERS = 2


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A GPU as the planner knows it: its key in flops.PEAK_FLOPS and its memory."""

    name: str
    memory_gib: float


# Names a user types (case-insensitive), the planner's own keys included.
GPUS = {
    "a100-40gb": Gpu("A100", 40.0),
    "a100-80gb": Gpu("A100", 80.0),
    "a100": Gpu("A100", 80.0),
    "h100": Gpu("H100-SXM", 80.0),
    "h100-sxm": Gpu("H100-SXM", 80.0),
    "h100-pcie": Gpu("H100-PCIe", 80.0),
    "h200": Gpu("H200", 140.0),  # nvidia-smi reports 143,771 MiB (NVIDIA's "141 GB")
}


def gpu(name: str) -> Gpu:
    """The GPU of a name in GPUS, any case."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; use one of {', '.join(GPUS)}.") from None


class Shape(NamedTuple):
    """A BLOOM model's shape (duck-types flops.ModelShape)."""

    n_layer: int
    hidden_size: int
    n_head: int
    vocab_size: int = VOCAB_SIZE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


# BLOOM-176B as trained: its shape, tokens, and the step time BigScience logged on 384 A100s
# for its 2048 x 2048-token batch (reference facts §3.3 and §5).
BLOOM_176B = Shape(n_layer=70, hidden_size=14336, n_head=112)
BLOOM_176B_TOKENS = 366e9
BLOOM_STEP_S = 105.22
BLOOM_GPUS = 384
BLOOM_BATCH = 2048
BLOOM_SEQUENCE_LENGTH = 2048
# Model FLOPs utilization (K = 3) of that step on the A100's 312 TFLOP/s bfloat16 peak: 35.8%.
# BigScience's logged 149 TFLOP/s counted the recomputed forward (K = 4): 47.8% of peak.
BLOOM_MFU = (flops.flops_per_step(BLOOM_176B, BLOOM_BATCH, BLOOM_SEQUENCE_LENGTH)
             / (BLOOM_STEP_S * BLOOM_GPUS * flops.PEAK_FLOPS["A100"]["bfloat16"]))



def budget_flops(gpu_hours: float, device: Gpu, mfu: float) -> float:
    """Model FLOPs that `gpu_hours` of `device` deliver at `mfu` of its bfloat16 peak."""
    if gpu_hours <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"need GPU-hours > 0 and 0 < MFU <= 1; got {gpu_hours} and {mfu}.")
    return gpu_hours * 3600 * flops.PEAK_FLOPS[device.name]["bfloat16"] * mfu


def candidate_shapes(min_params: float, max_params: float, heads_multiple: int,
                     hidden_multiple: int) -> Iterator[Shape]:
    """Every shape with min_params <= parameters <= max_params, head_dim in HEAD_DIMS, heads a
    multiple of `heads_multiple` (the tensor axis that may shard them) and hidden a multiple of
    `hidden_multiple` (the fsdp axis that shards it), at a depth within ASPECT_RATIOS."""
    for head_dim in HEAD_DIMS:
        n_head = heads_multiple
        while flops.param_count(Shape(MIN_LAYERS, n_head * head_dim, n_head)) <= max_params:
            hidden = n_head * head_dim
            if hidden % hidden_multiple == 0:
                shallowest = max(MIN_LAYERS, -(-hidden // ASPECT_RATIOS[1]))
                for n_layer in range(shallowest, max(shallowest, hidden // ASPECT_RATIOS[0]) + 1):
                    shape = Shape(n_layer, hidden, n_head)
                    if min_params <= flops.param_count(shape) <= max_params:
                        yield shape
            n_head += heads_multiple


class Candidate(NamedTuple):
    """A shape trained on what a budget pays for, and the loss a law predicts for it."""

    shape: Shape
    params: int
    tokens: float
    loss: float


def rank_shapes(budget: float, law: scaling.ParametricLaw, seq_len: int, heads_multiple: int,
                hidden_multiple: int, count: int = 8, spread: float = 4.0) -> list[Candidate]:
    """The `count` best widths within `spread`x of the law's optimal size, each at its best depth,
    lowest predicted loss first."""
    optimal_params, _ = law.optimum(budget)
    best_per_width: dict[int, Candidate] = {}
    for shape in candidate_shapes(optimal_params / spread, optimal_params * spread,
                                  heads_multiple, hidden_multiple):
        params = flops.param_count(shape)
        tokens = budget / flops.flops_per_token(shape, seq_len)
        candidate = Candidate(shape, params, tokens, float(law.loss(params, tokens)))
        incumbent = best_per_width.get(shape.hidden_size)
        if incumbent is None or candidate.loss < incumbent.loss:
            best_per_width[shape.hidden_size] = candidate
    if not best_per_width:
        raise ValueError(
            f"no BLOOM shape (vocabulary {VOCAB_SIZE}, heads a multiple of {heads_multiple}, "
            f"hidden a multiple of {hidden_multiple}) has {optimal_params / spread:.3g} to "
            f"{optimal_params * spread:.3g} parameters; the budget of {budget:.3g} FLOPs is too "
            "small for a model with BLOOM's vocabulary.")
    return sorted(best_per_width.values(), key=lambda c: c.loss)[:count]


def short(value: float) -> str:
    """A count in three figures: 72248702500 -> '72.2B', 1.33e12 -> '1.33T'."""
    return metrics.human(value, ".3g", ".3g")


def format_laws(budget: float) -> str:
    """Each law's compute-optimal split of `budget`, and where BLOOM-176B sits on each."""
    laws = [*scaling.LAWS.values(), scaling.KAPLAN2020]
    bloom_params = flops.param_count(BLOOM_176B)
    bloom_non_embedding = bloom_params - BLOOM_176B.vocab_size * BLOOM_176B.hidden_size
    bloom_flops = 6 * bloom_params * BLOOM_176B_TOKENS
    lines = [f"compute-optimal split of {budget:.3g} FLOPs (C = 6ND):",
             f"  {'law':14s} {'parameters':>10s} {'tokens':>8s} {'tokens/param':>12s} "
             f"{'loss':>6s}"]
    for law in laws:
        params, tokens = law.optimum(budget)
        lines.append(f"  {law.name:14s} {short(params):>10s} {short(tokens):>8s} "
                     f"{tokens / params:12.1f} {law.loss(params, tokens):6.3f}")
    lines += [f"  ({scaling.KAPLAN2020.name}: non-embedding parameters, loss in nats of WebText2; "
              "the losses of different laws are on different data and do not compare)",
              f"BLOOM-176B ({bloom_params:,} parameters, {short(BLOOM_176B_TOKENS)} tokens, "
              f"{bloom_flops:.3g} FLOPs):"]
    for law in laws:
        params = bloom_non_embedding if law is scaling.KAPLAN2020 else bloom_params
        optimal_params, optimal_tokens = law.optimum(bloom_flops)
        lines.append(f"  {law.name:14s} predicted loss {law.loss(params, BLOOM_176B_TOKENS):.3f}; "
                     f"its compute's optimum: {short(optimal_params)} parameters, "
                     f"{short(optimal_tokens)} tokens (loss "
                     f"{law.loss(optimal_params, optimal_tokens):.3f})")
    return "\n".join(lines)


def format_candidates(candidates: list[Candidate], law: scaling.ParametricLaw) -> str:
    """The ranked shapes as a table."""
    lines = [f"BLOOM shapes near the optimum, by {law.name}'s predicted loss at the budget:",
             f"  {'layers':>6s} {'hidden':>6s} {'heads':>5s} {'head_dim':>8s} "
             f"{'parameters':>16s} {'tokens':>8s} {'tokens/param':>12s} {'loss':>6s}"]
    for c in candidates:
        lines.append(f"  {c.shape.n_layer:6d} {c.shape.hidden_size:6d} {c.shape.n_head:5d} "
                     f"{c.shape.head_dim:8d} {c.params:16,d} {short(c.tokens):>8s} "
                     f"{c.tokens / c.params:12.1f} {c.loss:6.3f}")
    return "\n".join(lines)
