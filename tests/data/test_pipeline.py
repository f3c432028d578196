"""The packed stream: batch layout, BLOOM's packing and document masking, Megatron's window order
and blending by the Mixture's rates, determinism, resume, process shards; validation batches."""

import json
import time

import numpy as np
import pytest
import seqio

from bloom_jax.data import languages
from bloom_jax.data import pipeline
from bloom_jax.data import tasks
from bloom_jax.data import tokenized
from tests.data.helpers import SHARED_ROOTS_SAMPLE, mixture

LENGTH = 16


def stream_of(train_tasks, seqio_tasks, vocabulary, rates=None, batch_size=8, seed=0, **kwargs):
    rates = rates or languages.mixture_rates({t.name: t.num_tokens for t in train_tasks})
    return pipeline.PackedStream(train_tasks, mixture(seqio_tasks, rates), vocabulary,
                                 sequence_length=LENGTH, batch_size=batch_size, seed=seed,
                                 process_index=0, process_count=1, **kwargs)


@pytest.fixture
def make(train_tasks, seqio_tasks, vocabulary):
    """stream_of with the default corpus's tasks."""
    return lambda **kwargs: stream_of(train_tasks, seqio_tasks, vocabulary, **kwargs)


def test_batch_follows_the_convention(make):
    batch = next(make())
    assert sorted(batch) == ["input_ids", "loss_weights", "positions", "segment_ids", "targets"]
    for key, value in batch.items():
        assert value.shape == (8, LENGTH), key
        assert value.dtype == (np.float32 if key == "loss_weights" else np.int32), key


def _documents(train_tasks):
    return {t.name: [t.tokens[a:b].tolist() for a, b in zip(t.starts[:-1], t.starts[1:])]
            for t in train_tasks}


def _contains(doc, piece):
    return any(doc[i:i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1))


def test_bloom_packing_is_one_segment_per_row(make, train_tasks, vocabulary):
    """tr11: documents follow each other in a row with no reset; every target is scored."""
    documents = _documents(train_tasks)
    stream = make(batch_size=64)
    holds_eos = 0
    for _ in range(4):
        batch, task_of_row = stream.next_with_tasks()
        assert np.all(batch["loss_weights"] == 1) and np.all(batch["segment_ids"] == 1)
        np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(LENGTH), (64, 1)))
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
        for row in range(64):
            tokens = batch["input_ids"][row].tolist() + [batch["targets"][row, -1]]
            holds_eos += vocabulary.eos_id in tokens[1:-1]
            pieces = np.split(tokens, np.flatnonzero(np.array(tokens) == vocabulary.eos_id) + 1)
            docs = documents[stream.tasks[task_of_row[row]].name]
            assert all(any(_contains(d, p.tolist()) for d in docs) for p in pieces if len(p))
    assert holds_eos > 10, "rows should cross document boundaries"


def test_document_masking_never_crosses_a_document(make, train_tasks, vocabulary):
    """Targets are next tokens; each segment is one document's text; EOS closes documents."""
    eos = vocabulary.eos_id
    documents = _documents(train_tasks)
    stream = make(batch_size=64, document_masking=True)
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


def _counts_after_each_batch(stream, num_batches):
    counts = np.zeros(len(stream.tasks))
    for _ in range(num_batches):
        counts += np.bincount(stream.next_with_tasks()[1], minlength=len(stream.tasks))
        yield counts


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_observed_shares_match_the_mixture(make, train_tasks, alpha):
    """Megatron's blending: after every batch each task holds its rate of the rows read so far
    to within two rows (a sampled mix strays by about sqrt(rows): 14 rows for English here)."""
    sizes = {t.name: t.num_tokens for t in train_tasks}
    rates = (languages.mixture_rates(sizes) if alpha is None
             else languages.mixture_rates(sizes, alpha=alpha))
    stream = make(rates=rates, batch_size=256)
    expected = np.array([rates[t.name] for t in stream.tasks])
    for counts in _counts_after_each_batch(stream, 8):
        assert np.all(np.abs(counts - expected * counts.sum()) < 2), (counts, expected)
    if alpha == 0.3:  # small languages are up-sampled relative to their size
        assert rates["roots_sw"] > sizes["roots_sw"] / sum(sizes.values())


def test_the_registered_mixture_sets_the_shares(train_tasks, seqio_tasks, vocabulary):
    """Changing the rates of the registered `roots` Mixture changes what the stream reads."""
    shares = {}
    for english in (0.8, 0.2):
        tasks.roots_mixture(seqio_tasks, {"roots_en": english, "roots_fr": 1 - english})
        stream = pipeline.PackedStream(
            train_tasks, seqio.get_mixture_or_task("roots"), vocabulary, sequence_length=LENGTH,
            batch_size=100, seed=0, process_index=0, process_count=1)
        assert [t.name for t in stream.tasks] == ["roots_en", "roots_fr"]
        shares[english] = np.mean(stream.next_with_tasks()[1] == 0)
    assert shares == {0.8: 0.8, 0.2: 0.2}


def test_make_stream_reads_the_mixture_it_registers(vocabulary):
    stream = pipeline.make_stream(vocabulary=vocabulary, sequence_length=LENGTH, batch_size=8,
                                  seed=0, process_index=0, process_count=1)
    registered = seqio.get_mixture_or_task("roots")
    total = registered.total_rate
    assert stream.rates == pytest.approx(
        {t.name: registered.get_rate(t) / total for t in registered.tasks})


def _synthetic_task(name, num_documents, seed):
    """A task of unique token ids 0..N-1 (so each token says where it came from)."""
    lengths = np.random.default_rng(seed).integers(1, 400, num_documents)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return tokenized.TokenizedTask(name, np.arange(starts[-1], dtype=np.int32), starts)


def test_no_batch_holds_consecutive_windows_of_a_stream(seqio_tasks, vocabulary):
    """Rows of one task in a batch are far apart in its stream (in-order reading put every row
    of a task next to the previous one). With 10,000 documents (~125,000 windows) per task and 8
    rows per task and batch, a random order puts two neighbours in one batch about once in 1,100
    batches; this seed has none in 50."""
    synthetic = [_synthetic_task("roots_en", 10_000, 1), _synthetic_task("roots_fr", 10_000, 2)]
    stream = pipeline.PackedStream(
        synthetic, mixture(seqio_tasks, {"roots_en": 0.5, "roots_fr": 0.5}), vocabulary,
        sequence_length=LENGTH, batch_size=16, seed=0, process_index=0, process_count=1)
    for _ in range(50):
        choices, windows = stream.next_samples()
        batch, task_of_row = stream.next_with_tasks()
        np.testing.assert_array_equal(task_of_row, choices)
        for t in range(2):
            ours = np.sort(windows[choices == t])
            assert len(ours) == 8 and np.all(np.diff(ours) > 1), ours
            read = pipeline.TaskWindows(synthetic[t], LENGTH, seed=0).token_indices(
                windows[choices == t])  # the rows hold those windows
            np.testing.assert_array_equal(batch["input_ids"][choices == t], read[:, :-1])


def test_each_epoch_reads_every_window_once_in_a_new_order():
    task = _synthetic_task("roots_en", 50, 3)
    windows = pipeline.TaskWindows(task, LENGTH, seed=0)
    per_epoch = windows.windows_per_epoch
    first, second = (windows.windows(np.arange(e * per_epoch, (e + 1) * per_epoch))
                     for e in range(2))
    np.testing.assert_array_equal(np.sort(first), np.arange(per_epoch))
    np.testing.assert_array_equal(np.sort(second), np.arange(per_epoch, 2 * per_epoch))
    assert not np.array_equal(first, second - per_epoch)


def test_windows_cut_the_epochs_of_shuffled_documents(train_tasks, vocabulary):
    """Windows overlap by one token and, laid end to end, give epoch after epoch of the task's
    documents, each epoch in its own order (Megatron's doc_idx and sample_idx)."""
    task = next(t for t in train_tasks if t.name == "roots_sw")
    windows = pipeline.TaskWindows(task, LENGTH, seed=0)
    count = 2 * task.num_tokens // LENGTH + 2
    indices = windows.token_indices(np.arange(count))  # [count, LENGTH + 1]
    np.testing.assert_array_equal(indices[1:, 0], indices[:-1, -1])
    stream = task.tokens[indices[:, :-1].ravel()]
    epochs = [stream[:task.num_tokens], stream[task.num_tokens:2 * task.num_tokens]]
    documents = sorted(tuple(d) for d in np.split(task.tokens, task.starts[1:-1]))
    for epoch in epochs:
        pieces = np.split(epoch, np.flatnonzero(epoch == vocabulary.eos_id) + 1)[:-1]
        assert sorted(tuple(d) for d in pieces) == documents
    assert not np.array_equal(epochs[0], epochs[1])


class _LazyTokens:
    """Tokens that may be read only by gathering integer indices; counts what was read."""

    def __init__(self, tokens):
        self._tokens, self.read = tokens, 0

    def __len__(self):
        return len(self._tokens)

    def __getitem__(self, index):
        assert isinstance(index, np.ndarray) and index.dtype.kind == "i", type(index)
        self.read += index.size
        return self._tokens[index]


def test_rows_are_gathered_from_a_lazy_token_array(seqio_tasks, vocabulary):
    """A store may keep the tokens on disk: the stream reads only its rows' tokens."""
    task = _synthetic_task("roots_en", 1000, 1)
    lazy = tokenized.TokenizedTask(task.name, _LazyTokens(task.tokens), task.starts)
    stream = pipeline.PackedStream([lazy], mixture(seqio_tasks, {"roots_en": 1.0}), vocabulary,
                                   sequence_length=LENGTH, batch_size=4, seed=0,
                                   process_index=1, process_count=2)
    batch = next(stream)
    assert lazy.tokens.read == 2 * (LENGTH + 1)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])


def test_same_seed_same_stream_other_seed_other_stream(make):
    first = [next(make(seed=3))["input_ids"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    other = next(make(seed=4))["input_ids"]
    assert not np.array_equal(first[0], other)


def test_restart_from_scratch_gives_the_next_batches(vocabulary):
    """Take K batches, save the state as JSON, rebuild everything, restore: same next batches."""
    make = lambda: pipeline.make_stream(vocabulary=vocabulary, sequence_length=LENGTH,
                                        batch_size=8, seed=7, process_index=0, process_count=1)
    uninterrupted = make()
    for _ in range(5):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    assert set(state) == {"version", "seed", "sequence_length", "rows_drawn"}
    expected = [next(uninterrupted) for _ in range(3)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert restored.get_state() == uninterrupted.get_state()


def test_restore_far_into_the_run_is_immediate(make):
    """The state is a few counters: restoring 10^7 rows into the run costs no replay."""
    stream = make()
    state = stream.get_state()
    state["rows_drawn"] = {name: 10_000_000 * (i + 1) for i, name in enumerate(state["rows_drawn"])}
    start = time.perf_counter()
    stream.set_state(state)
    batch = next(stream)
    assert time.perf_counter() - start < 1.0
    assert batch["input_ids"].shape == (8, LENGTH)


def test_state_from_another_setup_is_refused(make):
    state = make(seed=1).get_state()
    with pytest.raises(ValueError, match="seed=1 but this stream has 2"):
        make(seed=2).set_state(state)
    with pytest.raises(ValueError, match="same data_dir and mixture"):
        make(rates={"roots_en": 1.0}, seed=1).set_state(state)
    with pytest.raises(ValueError, match="version=1, an older sampling"):
        make(seed=1).set_state({**state, "version": 1})


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(train_tasks, seqio_tasks,
                                                                vocabulary, process_count):
    rates = languages.mixture_rates({t.name: t.num_tokens for t in train_tasks})
    make = lambda index, count: pipeline.PackedStream(
        train_tasks, mixture(seqio_tasks, rates), vocabulary, sequence_length=LENGTH,
        batch_size=8, seed=5, process_index=index, process_count=count)
    whole = make(0, 1)
    shards = [make(i, process_count) for i in range(process_count)]
    for _ in range(3):
        want = next(whole)
        parts = [next(shard) for shard in shards]
        for key in want:
            assert all(p[key].shape[0] == 8 // process_count for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    assert all(shard.get_state() == whole.get_state() for shard in shards)


def test_state_restores_on_another_number_of_processes(train_tasks, seqio_tasks, vocabulary,
                                                       make):
    single = make(seed=9)
    next(single)
    state = single.get_state()
    want = next(single)
    halves = [pipeline.PackedStream(train_tasks, mixture(seqio_tasks, single.rates), vocabulary,
                                    sequence_length=LENGTH, batch_size=8, seed=9,
                                    process_index=i, process_count=2) for i in range(2)]
    for half in halves:
        half.set_state(state)
    got = [next(half) for half in halves]
    np.testing.assert_array_equal(np.concatenate([g["targets"] for g in got]), want["targets"])


def test_mixture_tasks_without_data_are_an_error(train_tasks, seqio_tasks, vocabulary):
    without_sw = [t for t in train_tasks if t.name != "roots_sw"]
    with pytest.raises(ValueError, match=r"tasks that have no data: \['roots_sw'\]"):
        stream_of(without_sw, seqio_tasks, vocabulary, rates={"roots_en": 0.5, "roots_sw": 0.5})


def test_batch_not_divisible_by_processes_is_an_error(train_tasks, seqio_tasks, vocabulary):
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.PackedStream(train_tasks, mixture(seqio_tasks, {"roots_en": 1.0}), vocabulary,
                              sequence_length=LENGTH, batch_size=8, seed=0, process_index=0,
                              process_count=3)


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
