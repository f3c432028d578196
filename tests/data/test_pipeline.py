"""The packed stream: batch layout, packing, mixture shares, determinism, resume, process shards."""

import json
import time

import numpy as np
import pytest

from bloom_jax.data import languages
from bloom_jax.data import pipeline
from bloom_jax.data import tasks
from tests.data.helpers import SHARED_ROOTS_SAMPLE

LENGTH = 16


def stream_of(train_tasks, vocabulary, rates=None, batch_size=8, seed=0, **kwargs):
    rates = rates or languages.mixture_rates({t.name: t.num_tokens for t in train_tasks})
    return pipeline.PackedStream(train_tasks, rates, vocabulary, sequence_length=LENGTH,
                                 batch_size=batch_size, seed=seed, process_index=0,
                                 process_count=1, **kwargs)


def test_batch_follows_the_convention(train_tasks, vocabulary):
    batch = next(stream_of(train_tasks, vocabulary))
    assert sorted(batch) == ["input_ids", "loss_weights", "positions", "segment_ids", "targets"]
    for key, value in batch.items():
        assert value.shape == (8, LENGTH), key
        assert value.dtype == (np.float32 if key == "loss_weights" else np.int32), key


def test_packing_never_crosses_a_document(train_tasks, vocabulary):
    """Targets are next tokens; each segment is one document's text; EOS closes documents."""
    eos = vocabulary.eos_id
    documents = {t.name: [t.tokens[a:b].tolist() for a, b in zip(t.starts[:-1], t.starts[1:])]
                 for t in train_tasks}
    stream = stream_of(train_tasks, vocabulary, batch_size=64)
    for _ in range(4):
        batch, task_of_row = stream.next_with_tasks()
        assert np.all(batch["loss_weights"] == 1)
        for row in range(64):
            inputs, targets = batch["input_ids"][row], batch["targets"][row]
            segments, positions = batch["segment_ids"][row], batch["positions"][row]
            np.testing.assert_array_equal(targets[:-1], inputs[1:])  # next-token targets
            assert segments[0] == 1 and np.all(np.diff(segments) >= 0)
            starts = np.flatnonzero(np.diff(segments)) + 1
            np.testing.assert_array_equal(np.flatnonzero(inputs[1:] == eos) + 1, starts)
            np.testing.assert_array_equal(np.flatnonzero(targets[:-1] == eos), starts - 1)
            for segment in np.unique(segments):
                where = segments == segment
                np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
                text = [t for t in inputs[where].tolist() + [targets[where][-1]] if t != eos]
                docs = documents[stream.tasks[task_of_row[row]].name]
                assert any(_contains(doc, text) for doc in docs), "segment is not from one document"


def _contains(doc, piece):
    return any(doc[i:i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1))


def _observed_row_shares(stream, num_batches):
    counts = np.zeros(len(stream.tasks))
    for _ in range(num_batches):
        counts += np.bincount(stream.next_with_tasks()[1], minlength=len(stream.tasks))
    return counts / counts.sum(), counts.sum()


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_observed_shares_match_rates(train_tasks, vocabulary, alpha):
    """Every row holds one task's tokens, so the token share is the row share.

    Tolerance: 4.5 binomial standard deviations of the observed share over 4,096 rows
    (a false failure about once in 150,000 runs per task).
    """
    sizes = {t.name: t.num_tokens for t in train_tasks}
    rates = (languages.mixture_rates(sizes) if alpha is None
             else languages.mixture_rates(sizes, alpha=alpha))
    stream = stream_of(train_tasks, vocabulary, rates=rates, batch_size=256)
    observed, n = _observed_row_shares(stream, 16)
    expected = np.array([rates[t.name] for t in stream.tasks])
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)
    if alpha == 0.3:  # small languages are up-sampled relative to their size
        assert rates["roots_sw"] > sizes["roots_sw"] / sum(sizes.values())


def test_same_seed_same_stream_other_seed_other_stream(train_tasks, vocabulary):
    first = [next(stream_of(train_tasks, vocabulary, seed=3))["input_ids"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    other = next(stream_of(train_tasks, vocabulary, seed=4))["input_ids"]
    assert not np.array_equal(first[0], other)


def test_restart_from_scratch_gives_the_next_batches(vocabulary):
    """Take K batches, save the state as JSON, rebuild everything, restore: same next batches."""
    make = lambda: pipeline.make_stream(vocabulary=vocabulary, sequence_length=LENGTH,
                                        batch_size=8, seed=7, process_index=0, process_count=1)
    uninterrupted = make()
    for _ in range(5):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = [next(uninterrupted) for _ in range(3)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert restored.get_state() == uninterrupted.get_state()


def test_restore_far_into_the_run_is_immediate(train_tasks, vocabulary):
    """The state is a few counters: restoring step 10^7 costs no replay."""
    stream = stream_of(train_tasks, vocabulary)
    state = stream.get_state()
    state["step"] = 10_000_000
    state["rows_drawn"] = {name: 10_000_000 * (i + 1) for i, name in enumerate(state["rows_drawn"])}
    start = time.perf_counter()
    stream.set_state(state)
    batch = next(stream)
    assert time.perf_counter() - start < 1.0
    assert batch["input_ids"].shape == (8, LENGTH)


def test_state_from_another_setup_is_refused(train_tasks, vocabulary):
    state = stream_of(train_tasks, vocabulary, seed=1).get_state()
    with pytest.raises(ValueError, match="seed=1 but this stream has 2"):
        stream_of(train_tasks, vocabulary, seed=2).set_state(state)
    fewer = stream_of(train_tasks, vocabulary, rates={"roots_en": 1.0}, seed=1)
    with pytest.raises(ValueError, match="same data_dir and mixture"):
        fewer.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(train_tasks, vocabulary,
                                                                process_count):
    rates = languages.mixture_rates({t.name: t.num_tokens for t in train_tasks})
    make = lambda index, count: pipeline.PackedStream(
        train_tasks, rates, vocabulary, sequence_length=LENGTH, batch_size=8, seed=5,
        process_index=index, process_count=count)
    whole = make(0, 1)
    shards = [make(i, process_count) for i in range(process_count)]
    for _ in range(3):
        want = next(whole)
        parts = [next(shard) for shard in shards]
        for key in want:
            assert all(p[key].shape[0] == 8 // process_count for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    assert all(shard.get_state() == whole.get_state() for shard in shards)


def test_state_restores_on_another_number_of_processes(train_tasks, vocabulary):
    single = stream_of(train_tasks, vocabulary, seed=9)
    next(single)
    state = single.get_state()
    want = next(single)
    halves = [pipeline.PackedStream(train_tasks, single.rates, vocabulary, sequence_length=LENGTH,
                                    batch_size=8, seed=9, process_index=i, process_count=2)
              for i in range(2)]
    for half in halves:
        half.set_state(state)
    got = [next(half) for half in halves]
    np.testing.assert_array_equal(np.concatenate([g["targets"] for g in got]), want["targets"])


def test_rates_for_tasks_without_data_are_an_error(train_tasks, vocabulary):
    with pytest.raises(ValueError, match="roots_yo"):
        stream_of(train_tasks, vocabulary, rates={"roots_en": 0.5, "roots_yo": 0.5})


def test_batch_not_divisible_by_processes_is_an_error(train_tasks, vocabulary):
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.PackedStream(train_tasks, {"roots_en": 1.0}, vocabulary, sequence_length=LENGTH,
                              batch_size=8, seed=0, process_index=0, process_count=3)


def test_endless_stream_crosses_epochs_in_a_new_order(train_tasks):
    task = next(t for t in train_tasks if t.name == "roots_sw")
    endless = pipeline._EndlessTokens(task, seed=0, task_index=0)
    two_epochs = endless.read(0, 2 * task.num_tokens)
    first, second = two_epochs[:task.num_tokens], two_epochs[task.num_tokens:]
    np.testing.assert_array_equal(np.sort(first), np.sort(task.tokens))
    np.testing.assert_array_equal(np.sort(second), np.sort(task.tokens))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(endless.read(5, 40), two_epochs[5:45])


def test_validation_batches_cover_each_token_once(vocabulary):
    streams = pipeline.validation_streams(vocabulary=vocabulary, sequence_length=LENGTH,
                                          batch_size=4, process_index=0, process_count=1)
    assert "roots_en" in streams
    for name, batches in streams.items():
        batches = list(batches)
        assert len(batches) == len(streams[name])
        scored = np.concatenate([b["targets"][b["loss_weights"] > 0] for b in batches])
        np.testing.assert_array_equal(scored, streams[name].task.tokens[1:])
        last = batches[-1]
        padding = last["loss_weights"] == 0
        assert padding.any() and np.all(last["segment_ids"][padding] == 0)


def test_validation_bytes_are_the_documents_utf8_bytes(vocabulary):
    """num_bytes decodes the tokens; here it is checked against the raw text of every language."""
    streams = pipeline.validation_streams(vocabulary=vocabulary, sequence_length=LENGTH,
                                          batch_size=4, process_index=0, process_count=1)
    roots = tasks.roots_tasks(vocabulary=vocabulary)
    assert len(streams) > 5
    for name, batches in streams.items():
        texts = list(roots[name].source.documents("validation"))
        assert batches.num_bytes == sum(len(text.encode("utf-8")) for text in texts) > 0, name


def test_validation_shards_cover_the_global_batches(train_tasks, vocabulary):
    make = lambda index, count: pipeline.ValidationBatches(
        train_tasks[0], vocabulary, sequence_length=LENGTH, batch_size=4,
        process_index=index, process_count=count)
    whole, halves = make(0, 1), [make(i, 2) for i in range(2)]
    assert len(whole) > 1
    for want, first, second in zip(whole, *halves):
        np.testing.assert_array_equal(np.concatenate([first["targets"], second["targets"]]),
                                      want["targets"])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ROOTS_SAMPLE.is_dir(), reason="../shared ROOTS sample not present")
def test_roots_sample_stream(vocabulary):
    stream = pipeline.make_stream(data_dir=SHARED_ROOTS_SAMPLE, vocabulary=vocabulary,
                                  sequence_length=LENGTH, batch_size=8, seed=0, process_index=0,
                                  process_count=1)
    assert len(stream.tasks) == 52
    assert stream.rates["roots_en"] > stream.rates["roots_zh"] > stream.rates["roots_tum"]
    assert next(stream)["input_ids"].shape == (8, LENGTH)
