"""The packed, deterministic, resumable stream of training batches, and validation batches.

Sampling follows Megatron's GPT dataset. Each task's documents are tokenized once (see
`tokenized.py`); its endless token stream is epoch after epoch of its documents, each epoch in a
fresh seeded order (Megatron's doc_idx). The stream is cut into windows of `length + 1` tokens,
window w starting at token w * length (sample_idx: no padding, a document may continue into the
next window). Windows are read in a seeded shuffled order, one permutation per epoch's worth of
windows (shuffle_idx), so the rows of a batch are not neighbours in a document. Which task fills
each row is Megatron's blending (`build_blending_indices`): row i of the run goes to the task
furthest below its rate, the rates being those of the seqio Mixture the stream is built from.
So a batch is a pure function of (seed, windows read so far per task), and those few integers
are the state that restores it exactly. Index arrays are built lazily per epoch and hold one
entry per document or window, never the tokens; tokens are read by one gather per task and batch.

Rows become a batch's features as `packing.py` packs them (BLOOM's packing by default).

Every process computes the same task choices for the global batch and reads only its own
contiguous block of rows, so the union over processes is the batch one process would read.
"""

from __future__ import annotations

import functools
import pathlib
import zlib
from typing import Iterator, Mapping, Sequence

import gin
import numpy as np
import seqio

from bloom_jax.data import languages
from bloom_jax.data import packing
from bloom_jax.data import tasks as tasks_lib
from bloom_jax.data import tokenized
from bloom_jax.data import vocabularies

_STATE_VERSION = 2  # 1: rows drawn in stream order, the task of a row drawn at random


class TaskWindows:
    """One task's windows of `length + 1` tokens in Megatron's order, as indices into its tokens.

    Needs only `task.starts` in memory; `task.tokens` may be a lazily read array.
    """

    def __init__(self, task: tokenized.TokenizedTask, length: int, seed: int):
        self._starts = np.asarray(task.starts, np.int64)  # [documents + 1]
        self._lengths = np.diff(self._starts)  # [documents]
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens == 0:
            raise ValueError(f"Task {task.name} has no tokens; give it documents or leave it out.")
        self.length = length
        self.windows_per_epoch = max(1, self.num_tokens // length)  # shuffled together
        self._seed = (seed, zlib.crc32(task.name.encode()))
        self._documents = functools.lru_cache(maxsize=4)(self._document_order)
        self._shuffle = functools.lru_cache(maxsize=2)(self._window_order)

    def _document_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Megatron's doc_idx for one epoch, and where each of its documents ends in the epoch."""
        order = _permutation((*self._seed, epoch), len(self._lengths))
        return order, np.cumsum(self._lengths[order])  # [documents], [documents]

    def _window_order(self, epoch: int) -> np.ndarray:
        """Megatron's shuffle_idx over one epoch's worth of windows."""
        return _permutation((*self._seed, epoch, 1), self.windows_per_epoch)

    def windows(self, samples: np.ndarray) -> np.ndarray:
        """The windows [n] that the task's samples [n] (its k-th rows read, k >= 0) read."""
        epoch, index = np.divmod(np.asarray(samples, np.int64), self.windows_per_epoch)
        windows = np.empty_like(epoch)
        for e in np.unique(epoch):
            at = epoch == e
            windows[at] = e * self.windows_per_epoch + self._shuffle(int(e))[index[at]]
        return windows

    def token_indices(self, windows: np.ndarray) -> np.ndarray:
        """Indices [n, length + 1] into the task's tokens of windows [n] of its endless stream."""
        positions = np.asarray(windows, np.int64)[:, None] * self.length + np.arange(
            self.length + 1)
        epoch, offset = np.divmod(positions, self.num_tokens)
        indices = np.empty_like(positions)
        for e in np.unique(epoch):
            at = epoch == e
            order, ends = self._documents(int(e))
            rank = np.searchsorted(ends, offset[at], side="right")  # sample_idx, per token
            document = order[rank]
            indices[at] = self._starts[document] + offset[at] - ends[rank] + self._lengths[document]
        return indices


def _permutation(seed: tuple[int, ...], n: int) -> np.ndarray:
    """A seeded permutation of range(n), in int32 where it fits (Megatron's index dtype)."""
    order = np.random.default_rng(seed).permutation(n)
    return order.astype(np.int32) if n < 2**31 else order


def blend(weights: np.ndarray, drawn: np.ndarray, count: int) -> np.ndarray:
    """Megatron's `build_blending_indices` for the next `count` samples: each goes to the task
    furthest below its weight, given the samples `drawn` [tasks] so far. Returns tasks [count]."""
    drawn = np.array(drawn, np.float64)
    first = int(drawn.sum())
    choices = np.empty(count, np.int64)
    for i in range(count):
        choices[i] = np.argmax(weights * max(first + i, 1) - drawn)
        drawn[choices[i]] += 1
    return choices


def process_rows(global_batch_size: int, process_index: int | None,
                  process_count: int | None) -> slice:
    """The contiguous rows of the global batch this process reads."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  # only to ask which process this is

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                         f"{process_count} processes; choose a multiple of {process_count}.")
    per_process = global_batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


class PackedStream:
    """Endless iterator of packed batches with a small, exact, JSON-serialisable state."""

    def __init__(self, tasks: Sequence[tokenized.TokenizedTask], mixture: seqio.Mixture,
                 vocabulary: seqio.Vocabulary, *, sequence_length: int, batch_size: int,
                 seed: int, document_masking: bool = False, process_index: int | None = None,
                 process_count: int | None = None):
        rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
        unknown = sorted(name for name, rate in rates.items()
                         if rate > 0 and name not in {t.name for t in tasks})
        if unknown:
            raise ValueError(f"Mixture {mixture.name!r} gives rates to tasks that have no data: "
                             f"{unknown}; give them documents or leave them out of the mixture.")
        self.tasks = [t for t in tasks if rates.get(t.name, 0) > 0]
        total = sum(rates[t.name] for t in self.tasks)
        self.rates = {t.name: rates[t.name] / total for t in self.tasks}
        self.vocabulary = vocabulary
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.seed = seed
        self.document_masking = document_masking
        self._weights = np.array(list(self.rates.values()))
        self._windows = [TaskWindows(t, sequence_length, seed) for t in self.tasks]
        self._rows = process_rows(batch_size, process_index, process_count)
        self._rows_drawn = np.zeros(len(self.tasks), np.int64)

    def __iter__(self) -> Iterator[packing.Batch]:
        return self

    def __next__(self) -> packing.Batch:
        return self.next_with_tasks()[0]

    def next_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch's plan, without reading it: per row [batch_size], the index
        into `self.tasks` it is read from and the window of that task's stream."""
        choices = blend(self._weights, self._rows_drawn, self.batch_size)
        picked = choices[:, None] == np.arange(len(self.tasks))  # [global_batch, tasks]
        earlier = np.cumsum(picked, axis=0) - picked
        sample = self._rows_drawn[choices] + earlier[np.arange(self.batch_size), choices]
        windows = np.empty_like(sample)
        for t in np.unique(choices):
            windows[choices == t] = self._windows[t].windows(sample[choices == t])
        return choices, windows

    def next_with_tasks(self) -> tuple[packing.Batch, np.ndarray]:
        """The next batch and, per row, the index into `self.tasks` it was read from."""
        all_choices, all_windows = self.next_samples()
        choices, windows = all_choices[self._rows], all_windows[self._rows]
        rows = np.empty([len(choices), self.sequence_length + 1], np.int32)
        for t in np.unique(choices):
            indices = self._windows[t].token_indices(windows[choices == t])
            rows[choices == t] = np.asarray(  # one gather per task from a possibly lazy array
                self.tasks[t].tokens[indices.ravel()]).reshape(indices.shape)
        self._rows_drawn += np.bincount(all_choices, minlength=len(self.tasks))
        valid = np.full(len(rows), self.sequence_length)
        return packing.pack(rows, valid, self.vocabulary.eos_id, self.document_masking), choices

    def get_state(self) -> dict:
        """The stream's position: JSON-serialisable, independent of the process count."""
        return {"version": _STATE_VERSION, "seed": self.seed,
                "sequence_length": self.sequence_length,
                "rows_drawn": {t.name: int(n) for t, n in zip(self.tasks, self._rows_drawn)}}

    def set_state(self, state: Mapping) -> None:
        """Continues from a `get_state()`: the next batch is the one that would have come next."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"Saved data state has version={state.get('version')!r}, an older "
                             f"sampling than this stream's (version {_STATE_VERSION}); its data "
                             "position does not carry over: resume with the bloom_jax that "
                             "saved it, or start a new MODEL_DIR.")
        expected = {"seed": self.seed, "sequence_length": self.sequence_length}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"Saved data state has {key}={state.get(key)!r} but this "
                                 f"stream has {value!r}; restore with the same {key} as the "
                                 f"saved run.")
        names = [t.name for t in self.tasks]
        if sorted(state["rows_drawn"]) != sorted(names):
            raise ValueError(f"Saved data state covers tasks {sorted(state['rows_drawn'])} but "
                             f"this stream has {sorted(names)}; restore with the same data_dir "
                             f"and mixture.")
        self._rows_drawn = np.array([state["rows_drawn"][n] for n in names], np.int64)


def as_vocabulary(vocabulary: seqio.Vocabulary | str | None) -> seqio.Vocabulary:
    """A Vocabulary as the data configurables take it: itself, a file path, or None (gin's
    `load_vocabulary.path`, else the embedded SentencePiece model)."""
    if isinstance(vocabulary, seqio.Vocabulary):
        return vocabulary
    if vocabulary is None:  # let gin's load_vocabulary.path apply
        return vocabularies.load_vocabulary()
    return vocabularies.load_vocabulary(vocabulary)


@gin.configurable
def make_stream(split: str = "train", *, data_dir: str | pathlib.Path | None = None,
                vocabulary: seqio.Vocabulary | str | None = None, sequence_length: int = 2048,
                batch_size: int, seed: int = 42, document_masking: bool = False,
                process_index: int | None = None,
                process_count: int | None = None) -> PackedStream:
    """The `roots` mixture as an endless stream of packed batches for this process.

    Registers the `roots` Mixture of the tasks found in `data_dir`, then reads its rates back
    from seqio's registry: the Mixture is what the stream mixes. `batch_size` is global, in
    sequences; this process gets batch_size / process_count rows. `data_dir` None reads the
    default corpus; `vocabulary` is a Vocabulary, a file path, or None (the shipped
    SentencePiece model). `document_masking`: one segment per document instead of BLOOM's one
    per row. Process index and count default to JAX's. Mixture knobs:
    `roots_tasks.languages_subset`, `mixture_rates.rates`, `mixture_rates.alpha`.
    Gin: `make_stream.data_dir = "/data/roots"`, `make_stream.seed = 42`.
    """
    vocabulary = as_vocabulary(vocabulary)
    seqio_tasks, loaded = tokenized.load_tasks(split, data_dir, vocabulary)
    tasks_lib.roots_mixture(seqio_tasks,
                            languages.mixture_rates({t.name: t.num_tokens for t in loaded}))
    return PackedStream(loaded, seqio.get_mixture_or_task(tasks_lib.MIXTURE_NAME), vocabulary,
                        sequence_length=sequence_length, batch_size=batch_size, seed=seed,
                        document_masking=document_masking, process_index=process_index,
                        process_count=process_count)


class ValidationBatches:
    """One pass over a task's validation documents in file order, as packed batches.

    The last row and the last batch are padded (segment 0, loss weight 0) so shapes stay fixed.
    """

    def __init__(self, task: tokenized.TokenizedTask, vocabulary: seqio.Vocabulary, *,
                 sequence_length: int, batch_size: int, document_masking: bool = False,
                 process_index: int | None = None, process_count: int | None = None):
        self.task = task
        self.document_masking = document_masking
        self.vocabulary = vocabulary
        self._length = sequence_length
        self._batch_size = batch_size
        self._rows = process_rows(batch_size, process_index, process_count)
        self._num_rows = -(-(task.num_tokens - 1) // sequence_length)  # windows overlap by one

    def __len__(self) -> int:
        return -(-self._num_rows // self._batch_size)

    @functools.cached_property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the task's text: each document decoded without its EOS.

        The denominator of bits per byte. Decoding the tokens (rather than re-reading the corpus)
        costs no second pass over the files and works from the token cache; for BLOOM's byte-level
        BPE and the shipped SentencePiece model (no normalization) it gives the documents' bytes.
        """
        documents = np.split(np.asarray(self.task.tokens), self.task.starts[1:-1])
        return sum(len(self.vocabulary.decode(doc[:-1].tolist()).encode("utf-8"))
                   for doc in documents)

    def __iter__(self) -> Iterator[packing.Batch]:
        for batch in range(len(self)):
            row_ids = np.arange(batch * self._batch_size,
                                (batch + 1) * self._batch_size)[self._rows]
            rows = np.zeros([len(row_ids), self._length + 1], np.int32)
            valid = np.zeros([len(row_ids)], np.int64)
            for i, row in enumerate(row_ids):
                window = self.task.tokens[row * self._length:row * self._length + self._length + 1]
                rows[i, :len(window)] = window
                valid[i] = max(len(window) - 1, 0)
            yield packing.pack(rows, valid, self.vocabulary.eos_id, self.document_masking)


@gin.configurable
def validation_streams(*, data_dir: str | pathlib.Path | None = None,
                       vocabulary: seqio.Vocabulary | str | None = None,
                       sequence_length: int = 2048, batch_size: int,
                       document_masking: bool = False, process_index: int | None = None,
                       process_count: int | None = None) -> dict[str, ValidationBatches]:
    """Per task, a finite, re-iterable sequence of validation batches for this process, packed
    as the training stream packs (`document_masking`)."""
    vocabulary = as_vocabulary(vocabulary)
    return {task.name: ValidationBatches(task, vocabulary, sequence_length=sequence_length,
                                         batch_size=batch_size, document_masking=document_masking,
                                         process_index=process_index,
                                         process_count=process_count)
            for task in tokenized.load_tasks("validation", data_dir, vocabulary)[1]}
