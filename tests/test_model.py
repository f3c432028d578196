"""Model tests that need no reference implementation: ALiBi, masks, scan/remat, bf16, init.

Logit parity against Hugging Face's BLOOM lives in test_convert.py (it goes through the converter).
"""

import dataclasses
import functools
import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.bloom import modeling_bloom

from bloom_jax import model as model_lib
from bloom_jax.model import BloomConfig, BloomForCausalLM, alibi_slopes, dot_product_attention

TINY = BloomConfig(vocab_size=128, hidden_size=48, n_layer=3, n_head=6)


@functools.cache
def init_params(config, length=12, seed=0):
    """The model's initial parameters (made once per arguments: an eager init takes seconds)."""
    ids = jnp.zeros((1, length), jnp.int32)
    variables = BloomForCausalLM(config).init(jax.random.PRNGKey(seed), ids)
    return nn.unbox(variables)["params"]


def random_ids(shape, vocab, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def loss_and_grads(config, params, ids):
    def loss(p):
        logits = BloomForCausalLM(config).apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, ids[..., None], -1)[..., 0])
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("n_head", [1, 2, 5, 6, 8, 12, 16, 20, 32, 112])
def test_alibi_slopes_match_reference(n_head):
    mask = torch.ones(1, 4, dtype=torch.long)
    # HF's alibi for a row of ones is slope_h * position; position 1 isolates the slopes.
    reference = modeling_bloom.build_alibi_tensor(mask, n_head, torch.float32)[:, 0, 1].numpy()
    np.testing.assert_allclose(alibi_slopes(n_head), reference, rtol=1e-6)


def test_parameters_carry_logical_axis_names():
    variables = jax.eval_shape(BloomForCausalLM(TINY).init, jax.random.PRNGKey(0),
                               jnp.zeros((1, 8), jnp.int32))
    leaves = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and None not in leaf.names
    layer_leaves = jax.tree_util.tree_leaves(
        variables["params"]["h"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(leaf.names[0] == "layers" for leaf in layer_leaves)


def test_initialization_follows_bloom():
    config = dataclasses.replace(TINY, hidden_size=96, n_head=6, initializer_range=0.05)
    params = init_params(config)
    assert np.all(params["ln_f"]["scale"] == 1) and np.all(params["ln_f"]["bias"] == 0)
    assert np.all(params["h"]["self_attention"]["query_key_value"]["bias"] == 0)
    assert np.std(params["word_embeddings"]["embedding"]) == pytest.approx(0.05, rel=0.05)
    assert np.std(params["h"]["mlp"]["dense_h_to_4h"]["kernel"]) == pytest.approx(0.05, rel=0.05)
    scaled = 0.05 / np.sqrt(2 * config.n_layer)  # Megatron's output-projection init
    assert np.std(params["h"]["mlp"]["dense_4h_to_h"]["kernel"]) == pytest.approx(scaled, rel=0.05)
    assert np.std(params["h"]["self_attention"]["dense"]["kernel"]) == pytest.approx(scaled, rel=0.1)


def test_packed_documents_do_not_see_each_other():
    params = init_params(TINY)
    model = BloomForCausalLM(TINY)
    doc_a, doc_b = random_ids((1, 5), TINY.vocab_size, 1), random_ids((1, 4), TINY.vocab_size, 2)
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
    logits = model.apply({"params": params}, packed, segment_ids=segment_ids, positions=positions)
    alone_a = model.apply({"params": params}, doc_a)
    alone_b = model.apply({"params": params}, doc_b)
    np.testing.assert_allclose(logits[:, :5], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:9], alone_b, atol=1e-5)


def test_left_padding_matches_unpadded():
    params = init_params(TINY)
    model = BloomForCausalLM(TINY)
    ids = random_ids((1, 7), TINY.vocab_size)
    padded = jnp.concatenate([jnp.full((1, 3), 3), ids], axis=1)
    mask = jnp.array([[0] * 3 + [1] * 7])
    logits = model.apply({"params": params}, padded, mask)
    np.testing.assert_allclose(logits[:, 3:], model.apply({"params": params}, ids), atol=1e-5)


def test_mask_and_segments_are_exclusive():
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="either attention_mask or segment_ids"):
        BloomForCausalLM(TINY).apply({"params": init_params(TINY, 4)}, ids, jnp.ones_like(ids),
                                     segment_ids=jnp.ones_like(ids))


@pytest.mark.parametrize("variant", [{"scan_layers": False}, {"remat_policy": "full"},
                                     {"remat_policy": "dots", "scan_layers": False},
                                     {"remat_policy": "selective"}])
def test_scan_and_remat_change_no_numbers(variant):
    params = init_params(TINY)
    ids = random_ids((2, 12), TINY.vocab_size)
    loss, grads = loss_and_grads(TINY, params, ids)
    other_loss, other_grads = loss_and_grads(dataclasses.replace(TINY, **variant), params, ids)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           other_grads, grads)


def test_bfloat16_compute_tracks_float32():
    params = init_params(TINY)
    ids = random_ids((2, 12), TINY.vocab_size)
    ref = BloomForCausalLM(TINY).apply({"params": params}, ids)
    bf16 = BloomForCausalLM(dataclasses.replace(TINY, dtype="bfloat16")).apply({"params": params}, ids)
    assert bf16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); after a few layers of
    # rounding the logits stay within 2% of their float32 scale.
    err = np.max(np.abs(np.asarray(bf16, np.float32) - np.asarray(ref)))
    assert err <= 0.02 * np.max(np.abs(np.asarray(ref))), err


def test_dropout_is_active_only_when_not_deterministic():
    config = dataclasses.replace(TINY, hidden_dropout=0.5, attention_dropout=0.5)
    params = init_params(config)
    ids = random_ids((1, 12), config.vocab_size)
    model = BloomForCausalLM(config)
    eval_logits = model.apply({"params": params}, ids)
    train_logits = model.apply({"params": params}, ids, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(model.apply({"params": params}, ids), eval_logits)
    assert not np.allclose(train_logits, eval_logits)


def test_pipelined_micro_batches_equal_the_stack_and_draw_their_own_dropout():
    """stages=2 over two identical micro-batches: without dropout both give the plain model's
    logits; with it each micro-batch (and each stage and layer) draws its own masks."""
    config = dataclasses.replace(TINY, n_layer=2, hidden_dropout=0.5)
    params = init_params(config)
    ids = random_ids((1, 12), config.vocab_size)
    twice = jnp.stack([ids, ids])  # [micro_batches, batch, length]
    plain = BloomForCausalLM(config).apply({"params": params}, ids)
    logits = BloomForCausalLM(config, stages=2).apply({"params": params}, twice)
    np.testing.assert_allclose(logits, jnp.stack([plain, plain]), rtol=1e-5, atol=1e-6)
    dropped = BloomForCausalLM(config, stages=2).apply(
        {"params": params}, twice, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(dropped[0], dropped[1]) and not np.allclose(dropped[0], plain)


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        BloomConfig(hidden_size=50, n_head=6)
    with pytest.raises(ValueError, match="remat_policy"):
        BloomConfig(remat_policy="sometimes")


def test_attention_through_jax_nn_matches_the_einsum_path():
    """Logits and gradients on packed rows with documents and padding."""
    params = init_params(TINY)
    ids = random_ids((2, 12), TINY.vocab_size)
    segment_ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 2 + [2] * 10])
    positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3,
                           list(range(2)) + list(range(10))])

    def logits_and_grads(config):
        def loss(p):
            logits = BloomForCausalLM(config).apply({"params": p}, ids, segment_ids=segment_ids,
                                                    positions=positions)
            return jnp.sum(jnp.where(segment_ids[..., None] != 0, logits, 0) ** 2), logits
        return jax.grad(loss, has_aux=True)(params)

    grads, logits = logits_and_grads(dataclasses.replace(TINY, attention_implementation="xla"))
    ref_grads, ref_logits = logits_and_grads(
        dataclasses.replace(TINY, attention_implementation="einsum"))
    real = segment_ids != 0
    np.testing.assert_allclose(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           grads, ref_grads)


@pytest.mark.parametrize("implementation", ["auto", "xla", "einsum"])
def test_attention_scale_is_the_exact_float_in_bfloat16(implementation):
    """q.k1 = 1024 scaled by 1/sqrt(96) is 104.51; key 2's bias is that exactly, so the query
    attends half to each. A scale rounded to bfloat16 (1/9.8125) gives 104.36 and 0.461."""
    head_dim = 96
    q = jnp.zeros((1, 1, 1, head_dim), jnp.bfloat16).at[..., 0].set(32)
    k = jnp.zeros((1, 2, 1, head_dim), jnp.bfloat16).at[0, 0, 0, 0].set(32)
    v = jnp.zeros((1, 2, 1, head_dim), jnp.bfloat16).at[0, 0, 0, 0].set(1)
    alibi = jnp.array([0.0, 1024 / np.sqrt(96)], jnp.float32).reshape(1, 1, 1, 2)
    out = dot_product_attention(q, k, v, alibi, jnp.ones((1, 1, 1, 2), bool), implementation,
                                causal=False)
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.5, abs=2e-3)


def test_einsum_attention_drops_normalized_probabilities():
    """Dropout acts on softmax(q k / sqrt(d) + alibi) as Megatron's does, though the einsum path
    divides by the softmax's sum only after the product with the values."""
    q, k, v = jax.random.normal(jax.random.key(1), (3, 2, 6, 4, 8))
    alibi = jnp.asarray(alibi_slopes(4))[None, :, None, None] * jnp.arange(6.0)
    mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    keep = jax.random.bernoulli(jax.random.key(2), 0.7, (2, 4, 6, 6))
    dropout = lambda probs: jnp.where(keep, probs / 0.7, 0)  # noqa: E731
    # causal=False: the scores in one piece, whatever CAUSAL_QUERY_BLOCKS (keep is their shape).
    out = dot_product_attention(q, k, v, alibi, mask, "einsum", causal=False, dropout=dropout)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + alibi
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(out, jnp.einsum("bhqk,bkhd->bqhd", dropout(probs), v),
                               rtol=1e-5, atol=1e-6)


def test_causal_einsum_attention_in_query_blocks_equals_the_whole():
    """Split into query blocks (causal=True), the einsum path gives every real token the output
    of the whole [q, k] scores, across documents and padding."""
    length = model_lib.CAUSAL_QUERY_BLOCKS * model_lib.CAUSAL_MIN_BLOCK  # the shortest split
    q, k, v = jax.random.normal(jax.random.key(3), (3, 2, length, 4, 8))
    # Row 0: a document across the first block boundary, a second one, then padding.
    first = length // 2 - 3
    segment_ids = jnp.array([[1] * first + [2] * (length - first - 5) + [0] * 5, [1] * length])
    positions = jnp.array([list(range(first)) + list(range(length - first - 5)) + [0] * 5,
                           list(range(length))])
    alibi, mask = model_lib.attention_inputs(4, segment_ids, positions)
    blocked = dot_product_attention(q, k, v, alibi, mask, "einsum", causal=True)
    whole = dot_product_attention(q, k, v, alibi, mask, "einsum", causal=False)
    real = segment_ids != 0
    np.testing.assert_allclose(blocked[real], whole[real], rtol=1e-6, atol=1e-6)


def test_auto_falls_back_from_cudnn_to_xla_and_says_so(monkeypatch, caplog):
    """On a GPU "auto" takes cuDNN; where cuDNN refuses a call (here: there is none), XLA's
    attention runs instead, and the log says so."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model_lib._warn_once.cache_clear()
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 8))
    alibi = jnp.asarray(alibi_slopes(2))[None, :, None, None] * jnp.arange(5.0)
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    with caplog.at_level(logging.WARNING, logger=model_lib.__name__):
        out = dot_product_attention(q, k, v, alibi, mask, "auto", causal=True)
    assert "cuDNN attention cannot take" in caplog.text
    assert "Falling back to XLA's attention" in caplog.text
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, alibi, mask, "xla",
                                                             causal=True))


def test_config_rejects_unknown_attention_implementation():
    with pytest.raises(ValueError, match="attention_implementation='flash' is not one of"):
        BloomConfig(attention_implementation="flash")


@pytest.mark.parametrize("implementation", ["xla", "einsum"])
def test_cached_decoding_matches_the_full_forward(implementation):
    params = init_params(TINY)
    model = BloomForCausalLM(dataclasses.replace(TINY, attention_implementation=implementation))
    ids = random_ids((2, 10), TINY.vocab_size)
    mask = jnp.array([[1] * 10, [0] * 4 + [1] * 6])  # the second row is left-padded
    full = model.apply({"params": params}, ids, mask)
    cache = nn.unbox(model.init(jax.random.PRNGKey(0), ids, decode=True)["cache"])
    decode = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
    logits = []
    for start, stop in [(0, 6), (6, 8), (8, 9), (9, 10)]:  # a prefill, then steps
        step_logits, variables = decode({"params": params, "cache": cache}, ids[:, start:stop],
                                        mask[:, start:stop])
        cache = variables["cache"]
        logits.append(step_logits)
    assert cache["index"] == 10
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1)[mask == 1], full[mask == 1],
                               atol=1e-5)


def test_cache_is_empty_stacked_over_layers_and_named():
    cache = BloomForCausalLM(TINY).init(jax.random.PRNGKey(0), jnp.ones((2, 9), jnp.int32),
                                        decode=True)["cache"]
    key = cache["h"]["self_attention"]["key"]
    assert key.value.shape == (TINY.n_layer, 2, TINY.n_head, 9, TINY.head_dim)
    assert key.names == ("layers", "activation_batch", "activation_heads", "activation_length",
                         "activation_kv")
    assert cache["token_mask"].names == ("activation_batch", "activation_length")
    assert all(np.all(leaf == 0) for leaf in jax.tree_util.tree_leaves(nn.unbox(cache)))


def copies_in(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """The instructions of compiled HLO text named for a copy or transpose with an f32 result:
    (name, the result's dimensions as laid out in memory, major to minor, size 1 left out)."""
    found = []
    for name, shape, layout in re.findall(
            r"%(\S*(?:copy|transpose)\S*) = f32\[([\d,]*)\]\{([\d,]*)\}", hlo):
        dims = [int(d) for d in shape.split(",") if d]
        minor_to_major = [int(i) for i in layout.split(",") if i]
        found.append((name, tuple(dims[i] for i in reversed(minor_to_major) if dims[i] > 1)))
    return found


def test_projection_gradients_never_transpose_the_tokens():
    """A projection's kernel gradient contracts one [tokens] axis, so XLA's CPU step copies no
    output gradient laid out [features, tokens] (over [batch, length] it copied each one: 20% of
    the tiny config's step). The tied head keeps its [batch, length] product on purpose (see
    BloomForCausalLM), and so its gradient's copy."""
    config = BloomConfig(vocab_size=320, hidden_size=64, n_layer=2, n_head=4, scan_layers=False)
    model = BloomForCausalLM(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)))
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    grad = jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, ids))[..., 0]))
    hlo = jax.jit(grad).lower(params).compile().as_text()
    tokens_minor = [(name, dims) for name, dims in copies_in(hlo)
                    if dims[1:] in ((ids.size,), ids.shape) and dims[0] != config.vocab_size]
    assert not tokens_minor, tokens_minor


def test_a_decode_step_reads_the_cache_as_it_lies():
    """One new token attends over the [batch, heads, length, head_dim] cache without copying it
    laid out otherwise: XLA's CPU dots copied the keys and values transposed at every token (a
    batch-1 decode of an 8 x 512 model: 4-9% of its time)."""
    config = BloomConfig(vocab_size=256, hidden_size=64, n_layer=1, n_head=4,
                         attention_implementation="einsum")
    model = BloomForCausalLM(config)
    cache = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 24), jnp.int32),
                                decode=True)["cache"])
    cache_dims = (config.n_head, 24, config.head_dim)  # batch 1, one layer

    def step(params, cache, ids):
        return model.apply({"params": params, "cache": cache}, ids, decode=True,
                           mutable=["cache"])
    hlo = jax.jit(step, donate_argnums=1).lower(init_params(config), cache,
                                                jnp.ones((1, 1), jnp.int32)).compile().as_text()
    transposed = [name for name, dims in copies_in(hlo)
                  if math.prod(dims) == math.prod(cache_dims) and dims != cache_dims]
    assert not transposed, transposed


def test_projection_gradients_never_transpose_a_kernel():
    """The projections multiply by their kernel flattened to a matrix, so XLA's CPU step copies
    no kernel transposed (it did for query_key_value's: 0.9 s of BLOOM-560M's 13 s step)."""
    config = BloomConfig(vocab_size=256, hidden_size=256, n_layer=1, n_head=4)
    block = model_lib.Block(config, deterministic=True)
    x = jnp.ones((2, 16, config.hidden_size))
    alibi, mask = jnp.zeros((2, config.n_head, 1, 16)), jnp.ones((2, 1, 16, 16), bool)
    params = nn.unbox(block.init(jax.random.key(0), x, alibi, mask)["params"])
    kernel_sizes = {leaf.size for leaf in jax.tree.leaves(params) if leaf.ndim > 1}
    grad = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x, alibi, mask)[0] ** 2))
    hlo = jax.jit(grad).lower(params).compile().as_text()
    copied = [name for name, dims in copies_in(hlo) if math.prod(dims) in kernel_sizes]
    assert not copied, copied
