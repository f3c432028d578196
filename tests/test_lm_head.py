"""The LM head's cross-entropy a vocabulary slice at a time: the same loss and gradients as the
whole logits (optax), as the model's own head, and as Hugging Face's BLOOM with `labels`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from bloom_jax import convert, lm_head, step as step_lib
from bloom_jax.model import BloomConfig, BloomForCausalLM
from tests.test_convert import random_hf_model

TOKENS, EMBED, VOCAB = 24, 16, 64


def random_inputs(seed=0):
    """hidden [tokens, embed], embedding [vocab, embed], targets and 0/1 weights [tokens]."""
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (TOKENS, EMBED))
    embedding = 0.3 * jax.random.normal(keys[1], (VOCAB, EMBED))
    targets = jax.random.randint(keys[2], (TOKENS,), 0, VOCAB)
    weights = (jax.random.uniform(keys[3], (TOKENS,)) > 0.3).astype(jnp.float32)
    return hidden, embedding, targets, weights


@pytest.mark.parametrize("chunks", [1, 4, 16])
def test_loss_and_gradients_equal_the_whole_logits(chunks):
    hidden, embedding, targets, weights = random_inputs()

    def whole(h, e):
        return jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(h @ e.T, targets))

    def sliced(h, e):
        return lm_head.cross_entropy_sum(h, e, targets, weights, chunks, jnp.float32)

    np.testing.assert_allclose(sliced(hidden, embedding), whole(hidden, embedding), rtol=1e-6)
    for ours, reference in zip(jax.grad(sliced, (0, 1))(hidden, embedding),
                               jax.grad(whole, (0, 1))(hidden, embedding)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_bfloat16_slices_compute_as_the_bfloat16_head():
    hidden, embedding, targets, weights = random_inputs(seed=1)

    def whole(h, e):  # the model's head: logits in bfloat16, the loss in float32
        logits = (h.astype(jnp.bfloat16) @ e.astype(jnp.bfloat16).T).astype(jnp.float32)
        return jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    def sliced(h, e):
        return lm_head.cross_entropy_sum(h, e, targets, weights, 8, jnp.bfloat16)

    # bfloat16 logits either way; XLA's blocking of the smaller products rounds a few apart
    np.testing.assert_allclose(sliced(hidden, embedding), whole(hidden, embedding), rtol=1e-4)
    for ours, reference in zip(jax.grad(sliced, (0, 1))(hidden, embedding),
                               jax.grad(whole, (0, 1))(hidden, embedding)):
        np.testing.assert_allclose(ours, reference, rtol=2e-2, atol=2e-3)


def test_train_loss_and_gradients_equal_hugging_face_s(tmp_path):
    """Mean loss over a batch's next tokens and every parameter's gradient, against transformers'
    BLOOM with labels (the tied embedding's gradient sums its head and its lookup)."""
    hf = random_hf_model(vocab=1024)
    hf.save_pretrained(tmp_path)
    config, params = convert.load_hf_checkpoint(tmp_path)
    config = dataclasses.replace(config, loss_vocab_chunks=8)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "segment_ids": np.ones((2, 8), np.int32),
             "positions": np.broadcast_to(np.arange(8), (2, 8)),
             "loss_weights": np.ones((2, 8), np.float32)}

    def mean_loss(p):
        loss_sum, weight_sum = step_lib.loss_sums(BloomForCausalLM(config), p, batch)
        return loss_sum / weight_sum

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    hf.zero_grad()
    hf_loss = hf(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss
    hf_loss.backward()
    np.testing.assert_allclose(loss, hf_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(grads["word_embeddings"]["embedding"],
                               hf.transformer.word_embeddings.weight.grad.numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["ln_f"]["scale"], hf.transformer.ln_f.weight.grad.numpy(),
                               rtol=1e-4, atol=1e-6)


def test_vocabulary_slices_must_divide_the_vocabulary():
    with pytest.raises(ValueError, match="loss_vocab_chunks=3 does not divide vocab_size=64"):
        BloomConfig(vocab_size=64, loss_vocab_chunks=3)
