"""Evaluation: the training loss, per-task figures, bits per byte, the trainer hook, and the
`python -m bloom_jax.evaluate` command."""

import json
import math
import os
import signal

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bloom_jax import configs, evaluation, optim, sharded_step, trainer
from bloom_jax import step as step_lib
from bloom_jax.data import pipeline, tokenized, vocabularies
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from tests import forked_commands
from tests.conftest import xla_flags
from tests.data.helpers import write_jsonl
from tests.test_metric_logger import read_scalars

MODEL = BloomForCausalLM(BloomConfig(vocab_size=1024, hidden_size=32, n_layer=2, n_head=4))
RULES = rules_lib.DEFAULT_RULES


@pytest.fixture(scope="module")
def vocabulary():
    return vocabularies.load_vocabulary()


@pytest.fixture(scope="module")
def params():
    return jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.create_mesh()


def run_evaluate(params, streams, mesh, model=MODEL):
    # One device: the mesh divides every batch shape, so the evaluator's check passes for all.
    evaluator = sharded_step.shard_eval(model, mesh, RULES, batch_size=1, sequence_length=1)
    return evaluation.evaluate(evaluator, params, streams)


def test_eval_loss_equals_the_training_loss_of_the_same_batch(vocabulary, params, mesh):
    rng = np.random.default_rng(0)
    lengths = [20, 25, 14]  # 59 tokens: 58 targets in 4 rows of 16, the last one padded
    documents = [np.append(rng.integers(3, 1024, n - 1), vocabulary.eos_id) for n in lengths]
    task = tokenized.TokenizedTask("roots_en", np.concatenate(documents).astype(np.int32),
                                   np.concatenate([[0], np.cumsum(lengths)]))
    batches = pipeline.ValidationBatches(task, vocabulary, sequence_length=16, batch_size=4,
                                         process_index=0, process_count=1)
    [batch] = list(batches)
    assert 0 < batch["loss_weights"].sum() < batch["loss_weights"].size

    optimizer = optim.make_optimizer()
    state = step_lib.create_train_state(params, optimizer, seed=0)
    train_step = jax.jit(step_lib.make_train_step(MODEL, optimizer))
    _, train_metrics = train_step(state, {k: v[None] for k, v in batch.items()}, 4)

    result = run_evaluate(params, {"roots_en": batches}, mesh)["roots_en"]
    np.testing.assert_allclose(result["loss"], train_metrics["loss"], rtol=1e-6)
    assert result["tokens"] == train_metrics["tokens"] == 58


def test_default_corpus_figures_hang_together(vocabulary, params, mesh):
    def streams(batch_size):
        return pipeline.validation_streams(vocabulary=vocabulary, sequence_length=64,
                                           batch_size=batch_size, process_index=0,
                                           process_count=1)
    by_four, by_one = streams(4), streams(1)
    results = run_evaluate(params, by_four, mesh)
    assert set(results) == {*by_four, evaluation.ALL} and "roots_en" in results
    for name, batches in by_four.items():
        r = results[name]
        assert r["tokens"] == batches.task.num_tokens - 1  # every token but the first is scored
        assert r["bytes"] == batches.num_bytes
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
        assert r["bits_per_byte"] == pytest.approx(
            r["loss"] * r["tokens"] / math.log(2) / r["bytes"], rel=1e-12)
        assert abs(r["loss"] - math.log(1024)) < 0.1  # a fresh model is nearly uniform

    blend = results[evaluation.ALL]
    tasks = [results[name] for name in by_four]
    assert blend["tokens"] == sum(r["tokens"] for r in tasks)
    assert blend["loss"] == pytest.approx(
        sum(r["loss"] * r["tokens"] for r in tasks) / blend["tokens"], rel=1e-12)
    assert blend["bits_per_byte"] == pytest.approx(
        sum(r["loss"] * r["tokens"] for r in tasks) / math.log(2) / blend["bytes"], rel=1e-12)

    one_row_at_a_time = run_evaluate(params, by_one, mesh)  # padding rows change nothing
    for name, r in results.items():
        assert one_row_at_a_time[name]["tokens"] == r["tokens"]
        np.testing.assert_allclose(one_row_at_a_time[name]["loss"], r["loss"], rtol=1e-5)


@pytest.mark.parametrize("document_masking", [False, True])
def test_bits_per_byte_on_a_hand_made_corpus(tmp_path, vocabulary, params, mesh,
                                             document_masking):
    texts = ["Café crème, naïve façade.", "河流穿过森林。", "Short one.", "Ñandú — ¿qué?"]
    write_jsonl(tmp_path / "en" / "documents.jsonl", ["Training text that is not evaluated."])
    write_jsonl(tmp_path / "en" / "validation" / "documents.jsonl", texts)
    streams = pipeline.validation_streams(data_dir=tmp_path, vocabulary=vocabulary,
                                          sequence_length=128, batch_size=2,
                                          document_masking=document_masking, process_index=0,
                                          process_count=1)
    result = run_evaluate(params, streams, mesh)["roots_en"]

    eos = vocabulary.eos_id
    documents = [[*vocabulary.encode(text), eos] for text in texts]
    if document_masking:  # independently: each document alone, unpacked, after the previous
        # document's EOS (none for the first, whose first token is context only)
        pairs = [(documents[0][:-1], documents[0][1:])] + [([eos, *d[:-1]], d)
                                                           for d in documents[1:]]
    else:  # BLOOM's packing: the documents as one causal sequence (they fit in one row)
        text = sum(documents, [])
        assert len(text) <= 129
        pairs = [(text[:-1], text[1:])]
    # one right-padded batch
    width = max(len(inputs) for inputs, _ in pairs)
    pad = lambda rows: jnp.array([row + [0] * (width - len(row)) for row in rows])
    inputs, targets = pad([i for i, _ in pairs]), pad([t for _, t in pairs])
    mask = pad([[1] * len(i) for i, _ in pairs])
    logits = jax.jit(MODEL.apply)({"params": params}, inputs, mask)
    nats = float(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask))
    tokens = int(mask.sum())
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)

    assert (result["tokens"], result["bytes"]) == (tokens, num_bytes)
    np.testing.assert_allclose(result["loss"], nats / tokens, rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], nats / math.log(2) / num_bytes,
                               rtol=1e-5)


def test_no_validation_documents_is_a_clear_error(params, mesh):
    with pytest.raises(ValueError, match="No task has validation documents"):
        run_evaluate(params, {}, mesh)


def test_table_has_a_line_per_task_and_the_blend():
    figures = evaluation.summarize(loss_sum=20.0, tokens=10, num_bytes=40)
    table = evaluation.format_table({"roots_en": figures, evaluation.ALL: figures})
    header, en, blend = table.splitlines()
    assert header.split()[:4] == ["task", "loss", "perplexity", "bits/byte"]
    assert en.split()[:4] == ["roots_en", "2.0000", "7.389", "0.7213"]
    assert blend.startswith("all ")


# ------------------------------------------------------------------------------------------------
# A very short training run with eval_every, then the command on its checkpoints.

TRAIN_SETTINGS = ["TRAIN_STEPS = 3", "BATCH_SIZE = 2", "SEQUENCE_LENGTH = 32",
                  "train.eval_every = 2", "roots_tasks.languages_subset = ['en', 'fr', 'hi']"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(MODEL_DIR, final state) of a 3-step tiny run that evaluates at steps 2 and 3."""
    model_dir = tmp_path_factory.mktemp("run")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    configs.parse(["tiny.gin"], [f"MODEL_DIR = '{model_dir}'", *TRAIN_SETTINGS])
    try:
        state = trainer.train()
    finally:
        gin.clear_config()
        for sig, handler in handlers.items():  # the trainer catches preemption signals
            signal.signal(sig, handler)
    return model_dir, state


@pytest.mark.slow
def test_trainer_logs_eval_figures_of_its_parameters(trained_run, mesh):
    model_dir, state = trained_run
    scalars = read_scalars(model_dir)
    tasks = ["roots_en", "roots_fr", "roots_hi", evaluation.ALL]
    for task in tasks:
        for figure in ("loss", "perplexity", "bits_per_byte"):
            assert [step for step, _ in scalars[f"eval/{figure}/{task}"]] == [2, 3]
    assert scalars["eval/loss/roots_en"][0] != scalars["eval/loss/roots_en"][1]  # parameters moved

    tiny = BloomForCausalLM(BloomConfig(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4))
    streams = pipeline.validation_streams(sequence_length=32, batch_size=2, process_index=0,
                                          process_count=1)
    expected = run_evaluate(state.params, {t: streams[t] for t in tasks[:3]}, mesh, tiny)
    for task in tasks:
        for figure in ("loss", "perplexity", "bits_per_byte"):
            np.testing.assert_allclose(scalars[f"eval/{figure}/{task}"][-1][1],
                                       expected[task][figure], rtol=1e-5)


@pytest.mark.slow
def test_command_evaluates_the_run_checkpoint_on_a_sharded_mesh(trained_run):
    """The command on 8 simulated devices, mesh (data 2, fsdp 2, tensor 2), gives the figures the
    one-device trainer logged for the same parameters."""
    model_dir, _ = trained_run
    command = ["evaluate", f"--ckpt_dir={model_dir}",
               "--gin_file=gin_configs/tiny.gin", "--json", "--gin.create_mesh.fsdp=2",
               "--gin.create_mesh.tensor=2",
               *(f"--gin_bindings={binding}" for binding in TRAIN_SETTINGS)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices=8)}
    done = forked_commands.run(command, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)

    scalars = read_scalars(model_dir)
    assert set(results) == {"roots_en", "roots_fr", "roots_hi", evaluation.ALL}
    for task, figures in results.items():
        assert set(figures) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
        for figure in ("loss", "perplexity", "bits_per_byte"):  # the trainer's last eval
            np.testing.assert_allclose(figures[figure],
                                       scalars[f"eval/{figure}/{task}"][-1][1], rtol=1e-5)
