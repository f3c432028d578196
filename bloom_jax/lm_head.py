"""The tied LM head and its cross-entropy, a vocabulary chunk at a time, never the whole logits.

With BLOOM's 250,880-token vocabulary the logits are the step's largest activation: at 560M, 1,024
tokens' float32 logits take 0.96 GiB, and autodiff keeps them, their softmax and their cotangent
at once. Here a custom VJP runs the head in `chunks` slices of the vocabulary: the forward pass
keeps only each token's log-sum-exp ([tokens]); the backward pass computes each slice's logits
again (one more head matmul, 2 x tokens x vocab x embed FLOPs) and writes its share of the
embedding's gradient in place. Slice c holds the vocabulary entries c, c + chunks, c + 2 chunks,
...: each slice is spread over the vocabulary's shards as the whole embedding is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _slices(embedding: jax.Array, chunks: int) -> jax.Array:
    """[vocab, embed] -> [vocab / chunks, chunks, embed]: [:, c] is slice c (a free reshape)."""
    vocab, embed = embedding.shape
    return embedding.reshape(vocab // chunks, chunks, embed)


def _slice_weights(slices: jax.Array, c: jax.Array, dtype) -> jax.Array:
    """Slice c's embedding rows in the compute dtype: [vocab / chunks, embed]."""
    return jax.lax.dynamic_index_in_dim(slices, c, axis=1, keepdims=False).astype(dtype)


def _logits(hidden: jax.Array, weights: jax.Array) -> jax.Array:
    """Float32 logits of one slice, computed in the weights' dtype as the whole head would:
    [tokens, vocab / chunks]."""
    return jnp.dot(hidden.astype(weights.dtype), weights.T).astype(jnp.float32)


def _in_slice(targets: jax.Array, c: jax.Array, chunks: int) -> tuple[jax.Array, jax.Array]:
    """Whether each target is in slice c, and its column there."""
    return targets % chunks == c, targets // chunks


def _log_normalizers(hidden, embedding, targets, chunks, dtype):
    """Each token's log-sum-exp over the vocabulary and its target's logit: ([tokens], [tokens])."""
    slices = _slices(embedding, chunks)

    def slice_step(carry, c):
        maximum, total, target_logit = carry
        logits = _logits(hidden, _slice_weights(slices, c, dtype))  # [tokens, vocab / chunks]
        new_maximum = jnp.maximum(maximum, jnp.max(logits, axis=-1))
        total = (total * jnp.exp(maximum - new_maximum)
                 + jnp.sum(jnp.exp(logits - new_maximum[:, None]), axis=-1))
        here, column = _in_slice(targets, c, chunks)
        picked = jnp.take_along_axis(logits, column[:, None], axis=-1)[:, 0]
        return (new_maximum, total, target_logit + jnp.where(here, picked, 0.0)), None

    tokens = hidden.shape[0]
    init = (jnp.full([tokens], -jnp.inf, jnp.float32), jnp.zeros([tokens], jnp.float32),
            jnp.zeros([tokens], jnp.float32))
    (maximum, total, target_logit), _ = jax.lax.scan(slice_step, init, jnp.arange(chunks))
    return maximum + jnp.log(total), target_logit


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cross_entropy_sum(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                      weights: jax.Array, chunks: int, dtype) -> jax.Array:
    """sum(weights * cross-entropy) of the logits hidden @ embedding.T computed in `dtype`.

    hidden: [tokens, embed] (after the final LayerNorm); embedding: [vocab, embed], the tied
    word embeddings; targets: [tokens] int; weights: [tokens] float32 (no gradient).
    """
    return _forward(hidden, embedding, targets, weights, chunks, dtype)[0]


def _forward(hidden, embedding, targets, weights, chunks, dtype):
    lse, target_logit = _log_normalizers(hidden, embedding, targets, chunks, dtype)
    return jnp.sum(weights * (lse - target_logit)), (hidden, embedding, targets, weights, lse)


def _backward(chunks, dtype, residuals, g):
    """d/dlogits = g * weights * (softmax - onehot), a slice at a time, into d hidden (summed
    over slices) and d embedding (each slice's rows written in place)."""
    hidden, embedding, targets, weights, lse = residuals
    slices = _slices(embedding, chunks)
    scale = (g * weights)[:, None]  # [tokens, 1]

    def slice_step(carry, c):
        d_hidden, d_slices = carry
        weights_c = _slice_weights(slices, c, dtype)
        logits = _logits(hidden, weights_c)  # [tokens, vocab / chunks]
        here, column = _in_slice(targets, c, chunks)
        onehot = (jnp.arange(logits.shape[1]) == column[:, None]) & here[:, None]
        d_logits = (scale * (jnp.exp(logits - lse[:, None]) - onehot)).astype(dtype)
        d_hidden = d_hidden + jnp.dot(d_logits, weights_c, preferred_element_type=jnp.float32)
        d_slice = jnp.dot(d_logits.T, hidden.astype(dtype)).astype(d_slices.dtype)
        d_slices = jax.lax.dynamic_update_index_in_dim(d_slices, d_slice, c, axis=1)
        return (d_hidden, d_slices), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(slices.shape, embedding.dtype))
    (d_hidden, d_slices), _ = jax.lax.scan(slice_step, init, jnp.arange(chunks))
    return d_hidden.astype(hidden.dtype), d_slices.reshape(embedding.shape), None, None


cross_entropy_sum.defvjp(_forward, _backward)
