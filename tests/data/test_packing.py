"""Packing token rows into a batch's features: segments, positions and the model's mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from bloom_jax import model
from bloom_jax.data import packing


@pytest.mark.parametrize("document_masking", [False, True])
def test_attention_mask_of_a_row_with_three_documents(document_masking):
    """The model's mask for a packed row: plain causal (BLOOM) or causal inside each document."""
    eos = 1
    row = np.array([[5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13]])  # 3 documents, length 10
    batch = packing.pack(row, np.array([10]), eos, document_masking)
    alibi, mask = model.attention_inputs(4, jnp.asarray(batch["segment_ids"]),
                                         jnp.asarray(batch["positions"]))
    causal = np.tril(np.ones((10, 10), bool))
    document = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])  # the EOS input opens the next document
    expected = causal & (document[:, None] == document[None, :]) if document_masking else causal
    np.testing.assert_array_equal(np.asarray(mask[0, 0]), expected)
    positions = [0, 1, 2, 0, 1, 2, 0, 1, 2, 3] if document_masking else list(range(10))
    np.testing.assert_array_equal(batch["positions"][0], positions)
    np.testing.assert_array_equal(np.asarray(alibi[0, :, 0]),
                                  np.outer(model.alibi_slopes(4), positions).astype(np.float32))
