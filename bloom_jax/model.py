"""BLOOM as a pure-functional Flax linen model.

The architecture of BigScience's BLOOM (Megatron-DeepSpeed GPT with ALiBi and an embedding
LayerNorm), numerically the same as Hugging Face's `BloomForCausalLM`. Every parameter and
activation carries logical axis names; `partitioning/` maps them onto a device mesh. The model
knows nothing of gin, checkpoints, data or meshes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# Logical axes of activations: the residual stream (with the LayerNorm and dropout activations on
# it: "activation_norm_length", which sequence parallelism shards), the MLP's hidden layer, and
# per-head queries, keys and values. The decoding cache holds keys and values heads-major, so that
# a decode step's attention dots read it as it is (length-major, it is transposed at every token).
EMBED_ACTIVATION_AXES = ("activation_batch", "activation_norm_length", "activation_embed")
MLP_ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_mlp")
HEAD_ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_heads",
                        "activation_kv")
CACHE_AXES = ("activation_batch", "activation_heads", "activation_length", "activation_kv")

# Names of `jax.checkpoint_policies` (plus "none": no rematerialization) that a config may use.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Megatron's selective recomputation (Korthikanti et al. 2022, arXiv:2205.05198): keeps each
    # layer's input, its queries, keys and values, the residual after attention and the MLP's
    # hidden layer; recomputes the LayerNorms, attention's softmax(q k + alibi) v and the GELU,
    # but no weight matmul. Sharded over `tensor` (with SP, the residuals too): 9 h / t a token.
    "selective": jax.checkpoint_policies.save_only_these_names(
        "layer_input", "query_key_value", "attention_residual", "mlp_hidden"),
    # Only each layer's bfloat16 input (LAYER_INPUT), on the device or (GPU) in pinned host memory.
    "layer_inputs": jax.checkpoint_policies.save_only_these_names("layer_input"),
    "layer_inputs_offloaded": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("layer_input",),
        offload_src="device", offload_dst="pinned_host"),
}
# How attention is computed (`BloomConfig.attention_implementation`): "cudnn" and "xla" through
# `jax.nn.dot_product_attention` (cuDNN's fused kernel; XLA's einsums), "einsum" materializes the
# float32 scores here (and is the only one with attention dropout); "auto" takes the fastest for
# the platform (`_auto_implementation`), and falls back from cuDNN to XLA, saying so in the log,
# where cuDNN refuses a call.
ATTENTION_IMPLEMENTATIONS = ("auto", "cudnn", "xla", "einsum")
# The einsum path splits causal attention into this many blocks of queries, skipping the masked
# scores above the diagonal blocks: the tiny config's CPU step (128 tokens) ~10% faster than in
# one piece (2 blocks: ~6%; 8: ~9%). Only blocks of CAUSAL_MIN_BLOCK queries or more: shorter ones
# save too little for the ops they add (test steps of 8-16 tokens ran 30% slower split).
CAUSAL_QUERY_BLOCKS = 4
CAUSAL_MIN_BLOCK = 32

_log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str) -> None:
    """Logs a fallback once, not at every trace of every layer."""
    _log.warning(message)


def _auto_implementation() -> str:
    """What "auto" runs: cuDNN's fused kernel on GPUs; on CPUs the einsum path, with which the
    tiny config's train step runs 20-24% faster than with jax.nn's XLA path; XLA's elsewhere."""
    return {"gpu": "cudnn", "cpu": "einsum"}.get(jax.default_backend(), "xla")


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Shape and numerics of a BLOOM model; field names follow Hugging Face's `BloomConfig`."""

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Any = jnp.float32  # compute dtype of matmuls and the residual stream
    param_dtype: Any = jnp.float32
    scan_layers: bool = True  # False unrolls the layer loop (same parameters, same numbers)
    remat_policy: str = "none"  # a key of REMAT_POLICIES
    attention_implementation: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    # The training loss's LM head in this many vocabulary slices (bloom_jax/lm_head.py), never
    # holding the whole logits; 1: the whole logits at once.
    loss_vocab_chunks: int = 1

    def __post_init__(self):
        # Accept dtype names ("bfloat16") as gin and JSON give them.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.hidden_size % self.n_head:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by n_head={self.n_head}; "
                "choose a head count that divides the hidden size.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of "
                             f"{sorted(REMAT_POLICIES)}.")
        if self.vocab_size % self.loss_vocab_chunks:
            raise ValueError(
                f"loss_vocab_chunks={self.loss_vocab_chunks} does not divide vocab_size="
                f"{self.vocab_size}; choose a divisor of it (1: the whole logits at once).")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation={self.attention_implementation!r} is "
                             f"not one of {list(ATTENTION_IMPLEMENTATIONS)}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def mlp_dim(self) -> int:
        return 4 * self.hidden_size


def alibi_slopes(n_head: int) -> np.ndarray:
    """ALiBi's per-head slopes, for any head count (BLOOM's rule for non-powers of two).

    With m = 2**floor(log2(n)): slopes 2**(-8i/m) for i = 1..m, then the odd-indexed slopes of
    the 2m-head sequence, 2**(-4(2k-1)/m) for k = 1..n-m.
    """
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = 2.0 ** (-8.0 * np.arange(1, closest + 1) / closest)
    extra = 2.0 ** (-4.0 * np.arange(1, 2 * (n_head - closest), 2) / closest)
    return np.concatenate([slopes, extra]).astype(np.float32)


def _normal(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _output_std(config: BloomConfig) -> float:
    """Megatron's scaled init of the output projections: std / sqrt(2 * n_layer)."""
    return config.initializer_range / math.sqrt(2 * config.n_layer)


def _layer_norm(config: BloomConfig, name: str) -> nn.LayerNorm:
    """LayerNorm whose statistics are computed in float32 whatever the compute dtype."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


def _cache_variable(module: nn.Module, name: str, value: Array, index: Array,
                    names: tuple[str, ...], axis: int = 1) -> Array:
    """Writes `value` (n tokens along `axis`) into the cache at slot `index` of that axis;
    returns the whole cache.

    `init` only sizes the cache (its length is the input's) and leaves it empty.
    """
    initialized = module.has_variable("cache", name)
    cache = module.variable("cache", name, nn.with_logical_partitioning(jnp.zeros, names),
                            value.shape, value.dtype)
    start = tuple(index if i == axis else 0 for i in range(value.ndim))
    updated = jax.lax.dynamic_update_slice(cache.value, value, start)
    if initialized:
        cache.value = updated
    return updated


class Projection(nn.Module):
    """x W + b over a kernel of several axes, the first `inputs` of them contracted with x's last.

    The kernel is created with its own axes, so it is sharded by their logical names (`names`;
    nn.DenseGeneral flattens it first, which fails under a mesh: google/flax#3676), and the
    product is one matrix product, [tokens, in] x [in, out] (bitcasts): over the kernel's own axes
    XLA's CPU library dots transposed the kernel and its gradient at every step (BLOOM-560M's
    query_key_value: 0.9 s of a 13 s CPU step), and over [batch, length] the kernel's gradient
    contracted two axes, which XLA's dots took by copying the output's gradient transposed (the
    tiny config's step: 20% of its time). Parameters: `kernel` and `bias` (output axes).
    """

    config: BloomConfig
    shape: tuple[int, ...]
    inputs: int
    names: tuple[str, ...]
    std: float

    @property
    def dtype(self):
        """The compute dtype (LoRA's interceptor computes the adapter's path in it)."""
        return self.config.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        param_dtype = self.config.param_dtype
        out_shape = self.shape[self.inputs:]
        kernel = self.param("kernel", _normal(self.std, self.names), self.shape, param_dtype)
        bias = self.param("bias", _zeros(self.names[self.inputs:]), out_shape, param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        fan_in = math.prod(self.shape[:self.inputs])
        y = jnp.dot(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1))  # [tokens, out]
        return y.reshape(*x.shape[:x.ndim - self.inputs], *out_shape) + bias


class Attention(nn.Module):
    """Multi-head self-attention with BLOOM's fused, head-interleaved query_key_value.

    With decode=True, keys and values are appended to the "cache" collection at `cache_index`
    and the queries attend over the whole cache ([batch, heads, max_length, head_dim]).
    """

    config: BloomConfig
    deterministic: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, alibi: Array, mask: Array,
                 cache_index: Array | None = None) -> Array:
        cfg = self.config
        # [batch, length, heads, 3, head_dim]: q, k, v per head, as BLOOM's [3h, h] weight has them.
        qkv = Projection(cfg, (cfg.hidden_size, cfg.n_head, 3, cfg.head_dim), inputs=1,
                         names=("embed", "heads", "qkv", "kv"), std=cfg.initializer_range,
                         name="query_key_value")(x)
        qkv = checkpoint_name(qkv, "query_key_value")
        names = HEAD_ACTIVATION_AXES
        q, k, v = (nn.with_logical_constraint(qkv[:, :, :, i], names) for i in range(3))
        if self.decode:  # [batch, heads, max_length, head_dim] in the cache (CACHE_AXES)
            k, v = (jnp.swapaxes(_cache_variable(self, name, jnp.swapaxes(x, 1, 2), cache_index,
                                                 CACHE_AXES, axis=2), 1, 2)
                    for name, x in (("key", k), ("value", v)))

        implementation = cfg.attention_implementation
        dropout = None
        if cfg.attention_dropout and not self.deterministic:
            dropout = functools.partial(nn.Dropout(cfg.attention_dropout), deterministic=False)
            if implementation == "auto":
                implementation = _auto_implementation()
            if implementation != "einsum":
                _warn_once(f"attention_implementation={implementation!r} has no attention "
                           f"dropout: attention dropout {cfg.attention_dropout:g} runs the einsum "
                           "path.")
                implementation = "einsum"
        out = dot_product_attention(q, k, v, alibi, mask, implementation,
                                    causal=not self.decode, dropout=dropout)
        out = nn.with_logical_constraint(out, names)  # [batch, length, heads, head_dim]

        return Projection(cfg, (cfg.n_head, cfg.head_dim, cfg.hidden_size), inputs=2,
                          names=("heads", "kv", "embed"), std=_output_std(cfg),
                          name="dense")(out)


def dot_product_attention(q: Array, k: Array, v: Array, alibi: Array, mask: Array,
                          implementation: str, *, causal: bool,
                          dropout: Any = None) -> Array:
    """softmax(q k / sqrt(head_dim) + alibi, where mask) v, the softmax in float32.

    q: [batch, q_length, heads, head_dim]; k, v: [batch, k_length, heads, head_dim]; alibi
    [batch, heads, 1, k_length] (float32); mask [batch, 1, q_length, k_length]. `causal` says the
    mask is causal in its own positions (not decoding), so cuDNN and the einsum path may skip
    the blocks above the diagonal.
    `dropout` (probs -> probs) needs implementation "einsum". The scale is the exact float
    1/sqrt(head_dim), as Megatron's and Hugging Face's.
    """
    scale = 1 / math.sqrt(q.shape[-1])
    if implementation == "auto":
        implementation = _auto_implementation()
        if implementation == "cudnn":
            try:
                return dot_product_attention(q, k, v, alibi, mask, "cudnn", causal=causal)
            except (ValueError, NotImplementedError, RuntimeError) as e:
                _warn_once(f"cuDNN attention cannot take q {q.shape}, k {k.shape} ({q.dtype}) "
                           f"with ALiBi's bias: {e}. Falling back to XLA's attention.")
                implementation = "xla"
    if implementation == "einsum":
        length = q.shape[1]
        size = length // CAUSAL_QUERY_BLOCKS
        if not causal or length % CAUSAL_QUERY_BLOCKS or size < CAUSAL_MIN_BLOCK:
            return _einsum_attention(q, k, v, alibi, mask, scale, dropout)
        # Causal: each block of queries attends only to the keys up to its own end, so the
        # scores above the diagonal blocks (3/8 of them with 4 blocks) are never computed.
        return jnp.concatenate([
            _einsum_attention(q[:, start:start + size], k[:, :start + size],
                              v[:, :start + size], alibi[..., :start + size],
                              mask[:, :, start:start + size, :start + size], scale, dropout)
            for start in range(0, length, size)], axis=1)
    return jax.nn.dot_product_attention(
        q, k, v, alibi, mask, scale=scale, is_causal=causal and implementation == "cudnn",
        implementation=implementation)


def _einsum_attention(q: Array, k: Array, v: Array, alibi: Array, mask: Array, scale: float,
                      dropout: Any) -> Array:
    """`dot_product_attention` with the float32 scores materialized: [batch, q, heads, head_dim]."""
    one_query = q.shape[1] == 1
    if one_query:
        # A decode step. Without the query axis and with the keys on the left, XLA's CPU dots
        # read the cache as it lies; otherwise they copied its keys and values transposed at
        # every token (8 x 512 model, batch 1: 4-9% of the decode).
        scores = jnp.einsum("bkhd,bhd->bhk", k, q[:, 0], preferred_element_type=jnp.float32)
        alibi, mask = alibi[:, :, 0], mask[:, :, 0]
    else:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * scale + alibi, jnp.finfo(jnp.float32).min)
    # The softmax's division waits for the output, as flash attention's does: dividing the
    # [batch, q, heads, head_dim] output spares a pass over the [batch, heads, q, k] scores.
    # The maximum only keeps exp in range; the result does not depend on it.
    maximum = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - maximum)  # [batch, heads, q, k]; one query: [batch, heads, k]
    total = jnp.sum(weights, axis=-1)  # [batch, heads, q]; one query: [batch, heads]
    if dropout is not None:
        weights = dropout(weights)
    if one_query:
        out = jnp.einsum("bhk,bkhd->bhd", weights.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
        return (out / total[..., None])[:, None].astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.swapaxes(total, 1, 2)[..., None]).astype(v.dtype)


class MLP(nn.Module):
    """hidden -> 4 hidden -> tanh-GELU -> hidden."""

    config: BloomConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = Projection(cfg, (cfg.hidden_size, cfg.mlp_dim), inputs=1, names=("embed", "mlp"),
                       std=cfg.initializer_range, name="dense_h_to_4h")(x)
        h = checkpoint_name(nn.with_logical_constraint(h, MLP_ACTIVATION_AXES), "mlp_hidden")
        h = jax.nn.gelu(h, approximate=True)
        return Projection(cfg, (cfg.mlp_dim, cfg.hidden_size), inputs=1, names=("mlp", "embed"),
                          std=_output_std(cfg), name="dense_4h_to_h")(h)


class Block(nn.Module):
    """One pre-LN transformer block; the (carry, output) signature lets `nn.scan` stack it."""

    config: BloomConfig
    deterministic: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, alibi: Array, mask: Array,
                 cache_index: Array | None = None) -> tuple[Array, None]:
        cfg = self.config
        dropout = nn.Dropout(cfg.hidden_dropout)
        x = checkpoint_name(x, "layer_input")
        h = _layer_norm(cfg, "input_layernorm")(x)
        h = Attention(cfg, self.deterministic, self.decode, name="self_attention")(
            h, alibi, mask, cache_index)
        # Each sublayer's output joins the residual stream's layout (sequence parallelism: a
        # reduce-scatter over `tensor` instead of an all-reduce) before dropout and the add.
        h = nn.with_logical_constraint(h, EMBED_ACTIVATION_AXES)
        x = checkpoint_name(x + dropout(h, deterministic=self.deterministic),
                            "attention_residual")
        h = _layer_norm(cfg, "post_attention_layernorm")(x)
        h = MLP(cfg, name="mlp")(h)
        h = nn.with_logical_constraint(h, EMBED_ACTIVATION_AXES)
        x = x + dropout(h, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, EMBED_ACTIVATION_AXES)
        return x, None


def attention_inputs(
        n_head: int, segment_ids: Array, positions: Array) -> tuple[Array, Array]:
    """ALiBi bias and attention mask from each token's document id and position.

    segment_ids: [batch, length], 0 marks padding; tokens attend causally inside their own document.
    positions:   [batch, length], the token's position inside its document.
    Returns alibi [batch, heads, 1, length] (float32, slope * key position: softmax is shift
    invariant per row, so this equals ALiBi's -slope * distance) and mask
    [batch, 1, length, length].
    """
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = causal & same_doc & (segment_ids[:, None, :] != 0)
    return _alibi(n_head, positions), mask[:, None]


def _alibi(n_head: int, positions: Array) -> Array:
    """ALiBi bias [batch, heads, 1, length] (float32) from key positions [batch, length]."""
    slopes = jnp.asarray(alibi_slopes(n_head))
    return slopes[None, :, None, None] * positions[:, None, None, :].astype(jnp.float32)


def _positions(attention_mask: Array) -> Array:
    """HF's ALiBi positions from a [batch, length] 0/1 mask: padding is skipped, and gets 0."""
    return (jnp.cumsum(attention_mask, axis=-1) - 1) * attention_mask


class BloomForCausalLM(nn.Module):
    """BLOOM language model: token ids -> next-token logits.

    Call with either an HF-style `attention_mask` ([batch, length], 1 = token, 0 = padding; ALiBi
    positions skip the padding as in the reference) or packed `segment_ids` and `positions`
    (tokens attend only inside their own document).

    stages > 1 runs the layers as a pipeline of that many stages (`pipelined_layers`), each
    micro-batch going round them `repeats` times, the parameters unchanged. Its inputs are then
    micro-batches, [micro_batches, batch, length] (or one, [batch, length]), that flow through the
    stages together, and so are the logits; when the stages divide the micro-batches, the LM head's
    work is split over the stages too.

    decode=True runs the cached path used for generation: `input_ids` ([batch, n]) are the next
    n tokens, appended to the "cache" collection (each layer's keys and values, the mask of
    every token written so far and the write index), and `attention_mask` ([batch, n]) marks
    which of them are padding. `init(..., decode=True)` sizes an empty cache by its input length.

    head=False returns the final hidden states ([..., length, embed], after `ln_f`) instead of
    the logits, for a loss that applies the tied head itself (`lm_head.cross_entropy_sum`).
    """

    config: BloomConfig
    stages: int = 1
    repeats: int = 1

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        head: bool = True,
    ) -> Array:
        cfg = self.config
        if attention_mask is not None and (segment_ids is not None or positions is not None):
            raise ValueError("Pass either attention_mask or segment_ids/positions, not both.")
        pipelined = self.stages > 1
        if pipelined and decode:
            raise ValueError("Decoding is not pipelined: use a model with stages=1.")
        one_micro_batch = pipelined and input_ids.ndim == 2
        if one_micro_batch:
            input_ids, attention_mask, segment_ids, positions = (
                None if a is None else a[None]
                for a in (input_ids, attention_mask, segment_ids, positions))
        cache_index = None
        if decode:
            if segment_ids is not None or positions is not None:
                raise ValueError("decode=True takes an attention_mask, not segment_ids/positions.")
            if attention_mask is None:
                attention_mask = jnp.ones_like(input_ids)
            alibi, mask, cache_index = self._cached_attention_inputs(attention_mask)
        else:
            if attention_mask is not None:
                segment_ids = attention_mask.astype(jnp.int32)
                positions = _positions(segment_ids)
            if segment_ids is None:
                segment_ids = jnp.ones_like(input_ids)
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
            if not pipelined:  # (each pipeline stage computes its micro-batch's own)
                alibi, mask = attention_inputs(cfg.n_head, segment_ids, positions)
        # A leading micro-batch axis, pipelined: whole on every stage into the pipeline, split
        # over the stages (when they divide it) out of it, for the LM head.
        micro_in = (None,) if pipelined else ()
        micro_out = (("activation_stage" if input_ids.shape[0] % self.stages == 0 else None,)
                     if pipelined else ())

        embed = nn.Embed(
            num_embeddings=cfg.vocab_size,
            features=cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_normal(cfg.initializer_range, ("vocab", "embed")),
            name="word_embeddings",
        )
        x = embed(input_ids)  # [batch, length, embed]
        x = _layer_norm(cfg, "word_embeddings_layernorm")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, (*micro_in, *EMBED_ACTIVATION_AXES))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        # Parameters are always stacked over a leading "layers" axis; scan_layers=False unrolls the
        # loop at compile time, so one checkpoint layout serves both.
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
            unroll=1 if cfg.scan_layers else cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, decode, name="h")
        if decode and not self.is_initializing():
            x = self._cached_layers(x, alibi, mask, cache_index, deterministic)
        elif not pipelined:
            x, _ = stack(x, alibi, mask, cache_index)
        elif self.is_initializing():  # creates the stacked parameters that the pipeline runs
            flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
            stack(flat(x), *attention_inputs(cfg.n_head, flat(segment_ids), flat(positions)),
                  None)
        else:
            x = pipelined_layers(cfg, self.variables["params"]["h"], x, segment_ids, positions,
                                 self.stages, self.repeats, deterministic,
                                 None if deterministic else self.make_rng("dropout"))
            x = nn.with_logical_constraint(x, (*micro_out, *EMBED_ACTIVATION_AXES))

        x = _layer_norm(cfg, "ln_f")(x)
        if not head:
            return x[0] if one_micro_batch else x
        # LM head tied to the word embeddings: [batch, length, vocab]. Unlike `Projection`, not
        # over [tokens]: flattened, XLA's CPU step took the embedding's gradient as a slower dot.
        logits = embed.attend(x)
        logits = nn.with_logical_constraint(
            logits, (*micro_out, "activation_batch", "activation_length", "activation_vocab"))
        return logits[0] if one_micro_batch else logits

    def _cached_layers(self, x: Array, alibi: Array, mask: Array, cache_index: Array,
                       deterministic: bool) -> Array:
        """The layers unrolled, each on its own parameters and cache (no scan: inside a decode
        loop, a scan would slice, i.e. copy, every layer's weights and cache at every token).

        Takes the stacked parameters and cache, or either already split per layer
        (`unstack_layers`, e.g. once before a decode loop); the cache comes out split.
        """
        n_layer = self.config.n_layer
        block = Block(self.config, deterministic, decode=True, parent=None)
        caches = []
        for params, cache in zip(unstack_layers(self.variables["params"]["h"], n_layer),
                                 unstack_layers(self.variables["cache"]["h"], n_layer)):
            rngs = None if deterministic else {"dropout": self.make_rng("dropout")}
            (x, _), variables = block.apply({"params": params, "cache": cache}, x, alibi, mask,
                                            cache_index, rngs=rngs, mutable=["cache"])
            caches.append(variables["cache"])
        self.put_variable("cache", "h", tuple(caches))
        return x

    def _cached_attention_inputs(self, attention_mask: Array) -> tuple[Array, Array, Array]:
        """Appends the new tokens' mask to the cache; ALiBi and mask of the new queries over it.

        attention_mask: [batch, n] for the n new tokens. Returns alibi [batch, heads, 1,
        max_length], mask [batch, 1, n, max_length] (causal in cache slots, padding excluded) and
        the slot of the first new token. Positions count the real tokens before each slot, as HF's.
        """
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        # [batch, max_length]: 1 where a real token has been written.
        token_mask = _cache_variable(self, "token_mask", attention_mask.astype(jnp.int32), start,
                                     ("activation_batch", "activation_length"))
        new, max_length = attention_mask.shape[1], token_mask.shape[1]
        if initialized:
            index.value = start + new
        slots = start + jnp.arange(new)
        causal = jnp.arange(max_length)[None, :] <= slots[:, None]  # [n, max_length]
        mask = causal[None] & (token_mask[:, None, :] != 0)
        return _alibi(self.config.n_head, _positions(token_mask)), mask[:, None], start


def unstack_layers(layers: Any, n_layer: int) -> tuple[Any, ...]:
    """A tree stacked over a leading "layers" axis as one tree per layer; a tuple of per-layer
    trees is returned as it is."""
    if isinstance(layers, (tuple, list)):
        return tuple(layers)
    return tuple(jax.tree.map(lambda a: a[i], layers) for i in range(n_layer))


def pipelined_layers(cfg: BloomConfig, layers: Any, inputs: Array, segment_ids: Array,
                     positions: Array, stages: int, repeats: int, deterministic: bool,
                     dropout_rng: Array | None) -> Array:
    """The layer stack as a circular pipeline (GPipe's when repeats = 1). The stack is cut into
    S x R groups of consecutive layers, group r S + s on stage s, and every micro-batch goes
    round the S stages R times. At iteration t, stage s runs round (t - s) // M of micro-batch
    (t - s) % M, then sends its output to the next stage, the last to the first (a collective
    permute over `stage`, a manual mesh axis here), where it waits for the micro-batch's next
    round. M micro-batches take M R + S - 1 iterations of 1 / R of a stage's layers, S - 1 of
    them idle per stage (`flops.pipeline_bubble`). A micro-batch is back at the first stage M
    iterations after it left it, so rounds need M >= S (fewer are run beside empty ones). When
    S R does not divide L, the stack is padded here (not in the parameters) with layers that
    pass their input through (`padded_layers`); they still cost their stage a layer's compute.

    layers: the scanned stack's parameters, [n_layer, ...] leaves; inputs: [micro_batches,
    batch, length, embed]; segment_ids, positions: [micro_batches, batch, length]. Returns the
    last layer's outputs, [micro_batches, batch, length, embed].
    """
    micro_batches = inputs.shape[0]
    if repeats > 1 and micro_batches < stages:  # e.g. an eval batch: run empty ones beside it
        def pad(a):
            return jnp.pad(a, [(0, stages - micro_batches)] + [(0, 0)] * (a.ndim - 1))
        return pipelined_layers(cfg, layers, pad(inputs), pad(segment_ids), pad(positions),
                                stages, repeats, deterministic, dropout_rng)[:micro_batches]
    padded = padded_layers(cfg.n_layer, stages * repeats)
    per_group = padded // (stages * repeats)

    def split(p, names):  # [n_layer, ...] -> [stages, per_group, repeats, ...] on the stages
        p = jnp.pad(p, [(0, padded - cfg.n_layer)] + [(0, 0)] * (p.ndim - 1))
        # Laid out as stored before it moves to the stages, so that XLA moves the gradients back
        # by the same all-to-all (reshaped while sharded over `stage`, it all-gathers them).
        p = nn.with_logical_constraint(p.reshape(repeats, stages, per_group, *p.shape[1:]),
                                       (None, "layers", None, *names[1:]))
        return nn.with_logical_constraint(jnp.moveaxis(p, 0, 2),
                                          ("activation_stage", None, None, *names[1:]))
    layers = jax.tree.map(split, layers, stack_axes(cfg))

    def layer(params, is_real, round_, x, segment_ids, positions, rng):
        """One layer on a micro-batch. Inside the remat, so that the backward pass computes them
        again instead of keeping them for every iteration: its parameters of round `round_`,
        taken from [repeats, ...] leaves, and its ALiBi bias and [length, length] mask."""
        params = jax.tree.map(lambda a: checkpoint_name(a[round_], "round_inputs"), params)
        alibi, mask = jax.tree.map(lambda a: checkpoint_name(a, "round_inputs"),
                                   attention_inputs(cfg.n_head, segment_ids, positions))
        y, _ = Block(cfg, deterministic, parent=None).apply(
            {"params": params}, x, alibi, mask, rngs=None if rng is None else {"dropout": rng})
        return y if padded == cfg.n_layer else jnp.where(is_real[round_], y, x)
    layer = jax.checkpoint(layer, prevent_cse=False, policy=(
        jax.checkpoint_policies.save_anything_except_these_names("round_inputs")
        if cfg.remat_policy == "none" else REMAT_POLICIES[cfg.remat_policy]))

    def stage(layers, received, inputs, segment_ids, positions, dropout_rng, axis):
        """Stage s = axis_index(axis) of the pipeline, its layers [per_group, repeats, ...]:
        returns what it received last of each micro-batch into `received` (zeros, [micro_batches,
        batch, length, embed]; stage 0: the last stage's outputs)."""
        s = jax.lax.axis_index(axis)
        ring = [(i, (i + 1) % stages) for i in range(stages)]
        # [per_group, repeats]: whether the stage's layer j of round r, (r S + s) G + j, is real.
        real = ((jnp.arange(repeats) * stages + s) * per_group
                + jnp.arange(per_group)[:, None]) < cfg.n_layer

        def iteration(carry, t):
            x, received = carry
            # What stage s - 1 gave last iteration; stage 0 gets the last stage's output of
            # micro-batch step t - S, kept for the micro-batch's next round, and takes micro-batch
            # t % M: new in the first round, that output after.
            x = jax.lax.ppermute(x, axis, ring)
            received = received.at[(t - stages) % micro_batches].set(x)
            first = jnp.where(t < micro_batches, inputs[t % micro_batches],
                              received[t % micro_batches])
            x = jnp.where(s == 0, first, x)
            step = t - s  # this stage's micro-batch step, negative while it idles
            round_ = jnp.clip(step // micro_batches, 0, repeats - 1)
            rngs = (None if dropout_rng is None else jax.random.split(
                jax.random.fold_in(jax.random.fold_in(dropout_rng, t), s), per_group))

            def run(x, params_real_rng):
                params, is_real, rng = params_real_rng
                micro = step % micro_batches
                return layer(params, is_real, round_, x, segment_ids[micro], positions[micro],
                             rng), None
            return (jax.lax.scan(run, x, (layers, real, rngs))[0], received), None

        iterations = micro_batches * repeats + stages - 1
        (x, received), _ = jax.lax.scan(iteration, (received[0], received),
                                        jnp.arange(iterations))
        # The last stage's final output still has to go round the ring.
        return received.at[(iterations - stages) % micro_batches].set(
            jax.lax.ppermute(x, axis, ring))

    received = nn.with_logical_constraint(jnp.zeros_like(inputs, shape=(stages, *inputs.shape)),
                                          ("activation_stage", None, *EMBED_ACTIVATION_AXES))
    args = (layers, received, inputs, jnp.asarray(segment_ids), jnp.asarray(positions),
            dropout_rng)
    stage_axis = nn.logical_to_mesh_axes(("activation_stage",))[0]
    if stage_axis is None:  # no mesh: the stages vmapped, with the same collectives
        return jax.vmap(functools.partial(stage, axis="stages"), axis_name="stages",
                        in_axes=(0, 0, None, None, None, None))(*args)[0]
    # Inside the pipeline, `stage` and the batch's mesh axes are manual: each stage sends its
    # output to the next by one collective permute per iteration, and each device sums its own
    # rows' weight gradients over the iterations, reduced across the batch axes once, at the
    # boundary (left to XLA, each iteration's gradients of each layer are all-reduced over them).
    batch_axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    inner_rules = tuple((name, _without(axes, (*batch_axes, stage_axis)))
                        for name, axes in nn.get_logical_axis_rules())

    def varying(x, axes):
        """`x` varying over mesh `axes` from here, so that the transpose, a psum, runs here once
        per pass (cast at each use inside the loop, it would run at each iteration); in float32
        (XLA's CPU compiler aborts on these bfloat16 psums)."""
        return jax.lax.pcast(x.astype(jnp.float32), axes, to="varying").astype(x.dtype)

    def manual(layers, received, inputs, segment_ids, positions, dropout_rng):
        inputs = varying(inputs, stage_axis)  # for stage 0
        if batch_axes:
            if dropout_rng is not None:  # a different mask for each device's rows
                dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(batch_axes))
            layers = jax.tree.map(lambda p: varying(p, batch_axes), layers)
        with nn.logical_axis_rules(inner_rules):
            received = stage(jax.tree.map(lambda p: p[0], layers), received[0], inputs,
                             segment_ids, positions, dropout_rng, stage_axis)
        return received[None]
    P = jax.sharding.PartitionSpec
    rows = P(None, batch_axes or None)  # [micro_batches, batch, ...]
    staged = P(stage_axis, None, batch_axes or None)  # [stages, micro_batches, batch, ...]
    return jax.shard_map(manual, in_specs=(P(stage_axis), staged, rows, rows, rows, P()),
                         out_specs=staged,
                         axis_names={*batch_axes, stage_axis})(*args)[0]


def _without(axes: Any, dropped: tuple[str, ...]) -> Any:
    """Mesh axes of a rule (a name, a tuple or None) without the `dropped` ones."""
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in dropped)
    return kept[0] if len(kept) == 1 else kept or None


@functools.cache
def stack_axes(config: BloomConfig) -> Any:
    """The logical axis names of the stacked layers' parameters ("layers" first), as a tree like
    theirs."""
    boxed = jax.eval_shape(functools.partial(BloomForCausalLM(config).init, jax.random.key(0)),
                           jnp.zeros((1, 1), jnp.int32))
    return nn.get_partition_spec(boxed)["params"]["h"]


def padded_layers(n_layer: int, groups: int) -> int:
    """Layers a pipeline of `groups` layer groups (stages x repeats) runs: `n_layer` rounded up
    to a multiple of `groups`."""
    return -(-n_layer // groups) * groups
