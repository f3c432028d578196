"""A training batch's features and how token rows become them; numpy only, so the planner and the
benchmark build batches without seqio or TensorFlow.

Rows are shifted into inputs and targets. BLOOM's packing (tr11 set none of Megatron's
--reset-attention-mask, --reset-position-ids, --eod-mask-loss): a row is one segment, plain
causal attention across the documents in it, positions counting from 0 and every target scored.
With `document_masking`, the EOS that closes a document starts the next document's segment (it
plays the role of BOS), positions restart there and tokens attend only inside their segment.
"""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]  # each [per_process_batch, length]

# The features of a batch and their dtypes, each [batch, length] (a train step stacks them
# [micro_steps, batch, length]); `pack` builds them, the planner compiles the step for them.
BATCH_FEATURES = {"input_ids": np.int32, "targets": np.int32, "segment_ids": np.int32,
                  "positions": np.int32, "loss_weights": np.float32}


def pack(rows: np.ndarray, valid: np.ndarray, eos_id: int, document_masking: bool) -> Batch:
    """Batch features from token rows [b, length + 1] whose first `valid[i] + 1` tokens are real.

    `valid` [b] counts the scored positions of each row (length for full rows). Without
    `document_masking` (BLOOM's packing) each row is one segment; with it, each document is.
    """
    inputs, targets = rows[:, :-1], rows[:, 1:]  # [b, length]
    index = np.arange(inputs.shape[1])
    real = index < valid[:, None]
    segment_ids, segment_start = np.ones_like(inputs), np.zeros_like(inputs)
    if document_masking:
        is_eos = (inputs == eos_id) & real
        segment_ids = 1 + np.cumsum(is_eos, axis=1) - is_eos[:, :1]
        segment_start = np.maximum.accumulate(np.where(is_eos, index, 0), axis=1)
    features = {
        "input_ids": np.where(real, inputs, 0),
        "targets": np.where(real, targets, 0),
        "segment_ids": np.where(real, segment_ids, 0),
        "positions": np.where(real, index - segment_start, 0),
        "loss_weights": real,
    }
    return {name: features[name].astype(dtype) for name, dtype in BATCH_FEATURES.items()}
