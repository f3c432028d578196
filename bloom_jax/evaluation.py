"""Validation loss, perplexity and bits per byte per language: the trainer's eval.

`evaluate()` runs the sharded eval step (`sharded_step.shard_eval`: `step.eval_step`, no
dropout) over every batch of each task's validation split and sums token losses and weights. The
trainer calls it every `eval_every` steps; `python -m bloom_jax.evaluate` runs it on a checkpoint.

Bits per byte = summed nats / ln 2 / UTF-8 bytes of the validation text (its documents as the
vocabulary decodes them, see `ValidationBatches.num_bytes`), so models with different tokenizers
compare. BLOOM has no BOS token: the first token of a task's text is context only and is not
scored, while its bytes are counted (one token per task). The entry "all" blends the tasks by
their tokens (total nats over total tokens, and over total bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from bloom_jax import param_store, sharded_step
from bloom_jax.data import pipeline, vocabularies
from bloom_jax.model import BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib

ALL = "all"  # the token-weighted blend of every task
Results = dict[str, dict[str, float]]  # task -> {"loss", "perplexity", "bits_per_byte", ...}


def summarize(loss_sum: float, tokens: float, num_bytes: int) -> dict[str, float]:
    """The figures of `tokens` scored targets (summed loss weights) whose losses sum to
    `loss_sum` nats, over text of `num_bytes` UTF-8 bytes."""
    loss = float(loss_sum / tokens)
    return {"loss": loss, "perplexity": float(np.exp(loss)),  # inf, not an error, if diverged
            "bits_per_byte": float(loss_sum / math.log(2) / num_bytes),
            "tokens": round(tokens), "bytes": num_bytes}


def evaluate(evaluator: sharded_step.ShardedEval, params,
             streams: Mapping[str, pipeline.ValidationBatches]) -> Results:
    """Per task (and blended as "all"): loss, perplexity, bits per byte, tokens and bytes.

    params: placed as training places them (any sharding works; jit follows the arrays).
    streams: each process's rows of the global validation batches (`validation_streams`).
    """
    if not streams:
        raise ValueError("No task has validation documents: give the corpus <language>/"
                         "validation/ folders, or documents to hold out (roots_tasks."
                         "validation_fraction).")
    sums = {}  # task -> [2] float64: summed nats, summed weights (= scored tokens)
    for name, batches in streams.items():
        per_batch = [evaluator.step(params, shardings_lib.put_batch(batch,
                                                                   evaluator.batch_sharding))
                     for batch in batches]  # dispatched asynchronously, fetched once
        sums[name] = np.sum(jax.device_get(per_batch), axis=0, dtype=np.float64)
    results = {name: summarize(*sums[name], streams[name].num_bytes) for name in streams}
    loss_sum, tokens = np.sum(list(sums.values()), axis=0)
    results[ALL] = summarize(loss_sum, tokens, sum(s.num_bytes for s in streams.values()))
    return results


def eval_scalars(results: Results) -> dict[str, float]:
    """Results as metric names: `eval/loss/<task>`, `eval/perplexity/<task>`, ... ("all" too)."""
    return {f"eval/{figure}/{task}": values[figure]
            for task, values in results.items()
            for figure in ("loss", "perplexity", "bits_per_byte")}


def format_table(results: Results) -> str:
    """One line per task, the blend last."""
    lines = [f"{'task':<24} {'loss':>8} {'perplexity':>12} {'bits/byte':>10} {'tokens':>12} "
             f"{'bytes':>14}"]
    for task, r in results.items():
        lines.append(f"{task:<24} {r['loss']:>8.4f} {r['perplexity']:>12.3f} "
                     f"{r['bits_per_byte']:>10.4f} {r['tokens']:>12,.0f} {r['bytes']:>14,}")
    return "\n".join(lines)


def evaluate_checkpoint(ckpt_dir: str, batch_size: int | None = None) -> Results:
    """Evaluates the latest parameters in `ckpt_dir` (a checkpoint directory or a run's
    MODEL_DIR) as the parsed gin config says: model, mesh, rules, SEQUENCE_LENGTH, DATA_DIR,
    vocabulary, languages. batch_size: global sequences per forward pass (default: one per
    data-parallel device)."""
    workload = sharded_step.Workload()
    model_config, sequence_length = workload.model_config, workload.sequence_length
    mesh = mesh_lib.create_mesh()
    rules = rules_lib.logical_axis_rules()
    batch_size = batch_size or mesh.shape["data"] * mesh.shape["fsdp"]
    evaluator = sharded_step.shard_eval(BloomForCausalLM(model_config), mesh, rules, batch_size,
                                        sequence_length)
    vocabulary = vocabularies.load_vocabulary()
    vocabularies.check_fits_model(vocabulary, model_config.vocab_size)
    _, params = param_store.load_params(
        ckpt_dir, model_config, sharded_step.param_shardings(evaluator.model, mesh, rules))
    streams = pipeline.validation_streams(vocabulary=vocabulary, batch_size=batch_size,
                                          sequence_length=sequence_length)
    logging.info("Evaluating %s on mesh %s, %d sequences of %d tokens per batch.", ckpt_dir,
                 dict(mesh.shape), batch_size, sequence_length)
    return evaluate(evaluator, params, streams)
