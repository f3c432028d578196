"""Validation loss, perplexity and bits per byte per language: the trainer's eval and its command.

`evaluate()` runs the jitted eval step (`step.eval_step`, no dropout) over every batch of each
task's validation split, sharded like training, and sums token losses and weights. The trainer
calls it every `eval_every` steps; the command evaluates a checkpoint:

    python -m bloom_jax.evaluate --ckpt_dir=/tmp/bloom_tiny/checkpoints \\
        --gin_file=gin_configs/tiny.gin [--data_dir=DIR] [--json]

Bits per byte = summed nats / ln 2 / UTF-8 bytes of the validation text (its documents as the
vocabulary decodes them, see `ValidationBatches.num_bytes`), so models with different tokenizers
compare. BLOOM has no BOS token: the first token of a task's text is context only and is not
scored, while its bytes are counted (one token per task). The entry "all" blends the tasks by
their tokens (total nats over total tokens, and over total bytes).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from bloom_jax import configs, param_store
from bloom_jax import step as step_lib
from bloom_jax.data import pipeline, vocabularies
from bloom_jax.model import BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib
from partitioning import validation

ALL = "all"  # the token-weighted blend of every task
Results = dict[str, dict[str, float]]  # task -> {"loss", "perplexity", "bits_per_byte", ...}


@functools.lru_cache(maxsize=8)
def _jitted_eval_step(model: BloomForCausalLM, mesh: jax.sharding.Mesh,
                      rules: rules_lib.Rules) -> Callable:
    """eval_step jitted once per (model, mesh, rules): jit does not key its cache on the rules
    its trace ran under. (params, batch) -> replicated (loss_sum, weight_sum)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(functools.partial(step_lib.eval_step, model),
                   out_shardings=(replicated, replicated))


def check_batch_size(mesh: jax.sharding.Mesh, rules: rules_lib.Rules, batch_size: int,
                     sequence_length: int) -> None:
    """Raises partitioning's MeshError if the mesh does not divide [batch, length] eval batches."""
    axes = validation.sharded_axes({}, rules, (batch_size, sequence_length))
    problems = validation.mesh_problems(mesh.shape, axes)
    if problems:
        raise mesh_lib.MeshError(
            f"Eval batches of {batch_size} sequences of {sequence_length} tokens do not fit the "
            f"mesh: {'; '.join(problems)}. Choose an eval batch size the mesh divides "
            "(--batch_size, or train.eval_batch_size in gin).")


def summarize(loss_sum: float, tokens: float, num_bytes: int) -> dict[str, float]:
    """The figures of `tokens` scored targets (summed loss weights) whose losses sum to
    `loss_sum` nats, over text of `num_bytes` UTF-8 bytes."""
    loss = float(loss_sum / tokens)
    return {"loss": loss, "perplexity": float(np.exp(loss)),  # inf, not an error, if diverged
            "bits_per_byte": float(loss_sum / math.log(2) / num_bytes),
            "tokens": round(tokens), "bytes": num_bytes}


def evaluate(model: BloomForCausalLM, params: Any,
             streams: Mapping[str, pipeline.ValidationBatches], *, mesh: jax.sharding.Mesh,
             rules: rules_lib.Rules) -> Results:
    """Per task (and blended as "all"): loss, perplexity, bits per byte, tokens and bytes.

    params: placed as training places them (any sharding works; jit follows the arrays).
    streams: each process's rows of the global validation batches (`validation_streams`).
    """
    if not streams:
        raise ValueError("No task has validation documents: give the corpus <language>/"
                         "validation/ folders, or documents to hold out (roots_tasks."
                         "validation_fraction).")
    sharding = shardings_lib.batch_sharding(mesh, rules)  # [batch, length]
    step = _jitted_eval_step(model, mesh, rules)
    sums = {}  # task -> [2] float64: summed nats, summed weights (= scored tokens)
    with rules_lib.activation_sharding(mesh, rules):
        for name, batches in streams.items():
            per_batch = [step(params, shardings_lib.put_batch(batch, sharding))
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


# ------------------------------------------------------------------------------------------------
# The command. This module registers no gin configurables: run as `python -m`, it is `__main__`,
# and the trainer imports it again as `bloom_jax.evaluate`.

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's own flags (configs.run adds --gin_file and --gin_bindings)."""
    flags.DEFINE_string("ckpt_dir", None, "A checkpoint directory (its root holds config.json), "
                        "e.g. from `bloom_jax.convert from_hf`, or a training run's MODEL_DIR; "
                        "the latest step's parameters are evaluated.", required=True)
    flags.DEFINE_string("data_dir", None, "ROOTS-style corpus whose validation split is "
                        "evaluated (default: gin's DATA_DIR, else the embedded corpus).")
    flags.DEFINE_integer("batch_size", None, "Global sequences per eval forward pass (default: "
                         "one per data-parallel device, data x fsdp). Results do not depend on it.")
    flags.DEFINE_bool("json", False, "Print one JSON object {task: {loss, perplexity, "
                      "bits_per_byte, tokens, bytes}} instead of a table.")


def evaluate_checkpoint(ckpt_dir: str, batch_size: int | None = None) -> Results:
    """Evaluates the latest parameters in `ckpt_dir` as the parsed gin config says (model,
    mesh, rules, SEQUENCE_LENGTH, DATA_DIR, vocabulary, languages)."""
    workload = configs.Workload.from_gin()
    model_config, sequence_length = workload.model_config, workload.sequence_length
    mesh = mesh_lib.create_mesh()
    rules = rules_lib.logical_axis_rules()
    batch_size = batch_size or mesh.shape["data"] * mesh.shape["fsdp"]
    check_batch_size(mesh, rules, batch_size, sequence_length)
    vocabulary = vocabularies.load_vocabulary()
    vocabularies.check_fits_model(vocabulary, model_config.vocab_size)

    model = BloomForCausalLM(model_config)
    boxed = shardings_lib.abstract_params(model, jax.ShapeDtypeStruct((1, 1), jnp.int32))
    _, params = param_store.load_params(ckpt_dir, model_config,
                                        shardings_lib.logical_shardings(boxed, mesh, rules))
    streams = pipeline.validation_streams(vocabulary=vocabulary, batch_size=batch_size,
                                          sequence_length=sequence_length)
    logging.info("Evaluating %s on mesh %s, %d sequences of %d tokens per batch.", ckpt_dir,
                 dict(mesh.shape), batch_size, sequence_length)
    return evaluate(model, params, streams, mesh=mesh, rules=rules)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.data_dir:
        FLAGS.gin_bindings = [*FLAGS.gin_bindings, f"DATA_DIR = {FLAGS.data_dir!r}"]
    configs.parse_flags()
    results = evaluate_checkpoint(FLAGS.ckpt_dir, FLAGS.batch_size)
    if jax.process_index() == 0:
        print(json.dumps(results) if FLAGS.json else format_table(results))


if __name__ == "__main__":
    define_flags()
    configs.run(main)
