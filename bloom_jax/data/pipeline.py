"""The packed, deterministic, resumable stream of training batches, and validation batches.

Each task's documents are tokenized once (see `tokenized.py`) and kept as one token array.
Every task then reads as an endless token stream: epoch after epoch of its documents, each epoch
in a fresh order drawn from the seed. Packed row k of a task is the window of `length + 1` tokens
starting at token k * length of that stream (BLOOM's Megatron packing: no padding, a document may
continue into the next row). Which task fills each row of a global batch is drawn from the seed
and the batch number. So a batch is a pure function of (seed, batch number, rows drawn so far per
task), and the state that restores it exactly is those few integers.

Rows are shifted into inputs and targets. The EOS that closes a document starts the next
document's segment (it plays the role of BOS), so every target is scored inside its own segment
and each document's targets end with EOS.

Every process computes the same task choices for the global batch and reads only its own
contiguous block of rows, so the union over processes is the batch one process would read.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Iterator, Mapping, Sequence

import gin
import numpy as np
import seqio

from bloom_jax.data import languages
from bloom_jax.data import tasks as tasks_lib
from bloom_jax.data import tokenized
from bloom_jax.data import vocabularies

Batch = dict[str, np.ndarray]  # each [per_process_batch, length]
_STATE_VERSION = 1


class _EndlessTokens:
    """A task's tokens as an endless stream of epochs, each a seeded permutation of its
    documents."""

    def __init__(self, task: tokenized.TokenizedTask, seed: int, task_index: int):
        if task.num_tokens == 0:
            raise ValueError(f"Task {task.name} has no tokens; give it documents or leave it out.")
        self._task = task
        self._lengths = np.diff(task.starts)
        self._seed = (seed, task_index)
        self._epoch = functools.lru_cache(maxsize=2)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng((*self._seed, epoch)).permutation(self._task.num_documents)
        return order, np.cumsum(self._lengths[order])  # [documents], [documents] ends in the epoch

    def read(self, position: int, count: int) -> np.ndarray:
        """`count` tokens of the stream from `position` on."""
        pieces = []
        while count > 0:
            epoch, offset = divmod(position, self._task.num_tokens)
            order, ends = self._epoch(epoch)
            first = np.searchsorted(ends, offset, side="right")
            last = np.searchsorted(ends, min(offset + count, self._task.num_tokens) - 1,
                                   side="right")
            docs = order[first:last + 1]  # the documents this read touches, in stream order
            run_ends = np.cumsum(self._lengths[docs])
            wanted = offset - (ends[first] - run_ends[0]) + np.arange(
                min(count, self._task.num_tokens - offset))  # positions in the run of docs
            doc = np.searchsorted(run_ends, wanted, side="right")
            run_starts = run_ends - self._lengths[docs]
            piece = self._task.tokens[self._task.starts[docs][doc] + wanted - run_starts[doc]]
            pieces.append(piece)
            position += len(piece)
            count -= len(piece)
        return np.concatenate(pieces)


# The features of a batch and their dtypes, each [batch, length] (a train step stacks them
# [micro_steps, batch, length]); `pack` builds them, the planner compiles the step for them.
BATCH_FEATURES = {"input_ids": np.int32, "targets": np.int32, "segment_ids": np.int32,
                  "positions": np.int32, "loss_weights": np.float32}


def pack(rows: np.ndarray, valid: np.ndarray, eos_id: int) -> Batch:
    """Batch features from token rows [b, length + 1] whose first `valid[i] + 1` tokens are real.

    `valid` [b] counts the scored positions of each row (length for full rows).
    """
    inputs, targets = rows[:, :-1], rows[:, 1:]  # [b, length]
    index = np.arange(inputs.shape[1])
    real = index < valid[:, None]
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

    def __init__(self, tasks: Sequence[tokenized.TokenizedTask], rates: Mapping[str, float],
                 vocabulary: seqio.Vocabulary, *, sequence_length: int, batch_size: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None):
        unknown = set(rates) - {t.name for t in tasks}
        if unknown:
            raise ValueError(f"Rates given for tasks that have no data: {sorted(unknown)}.")
        self.tasks = [t for t in tasks if rates.get(t.name, 0) > 0]
        total = sum(rates[t.name] for t in self.tasks)
        self.rates = {t.name: rates[t.name] / total for t in self.tasks}
        self.vocabulary = vocabulary
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.seed = seed
        self._probabilities = np.array(list(self.rates.values()))
        self._streams = [_EndlessTokens(t, seed, i) for i, t in enumerate(self.tasks)]
        self._rows = process_rows(batch_size, process_index, process_count)
        self._step = 0
        self._rows_drawn = np.zeros(len(self.tasks), np.int64)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_with_tasks()[0]

    def next_with_tasks(self) -> tuple[Batch, np.ndarray]:
        """The next batch and, per row, the index into `self.tasks` it was read from."""
        rng = np.random.default_rng((self.seed, self._step))
        choices = rng.choice(len(self.tasks), size=self.batch_size, p=self._probabilities)
        picked = choices[:, None] == np.arange(len(self.tasks))  # [global_batch, tasks]
        earlier = np.cumsum(picked, axis=0) - picked
        row_in_task = self._rows_drawn[choices] + earlier[np.arange(self.batch_size), choices]
        length = self.sequence_length
        rows = np.stack([self._streams[t].read(k * length, length + 1)
                         for t, k in zip(choices[self._rows], row_in_task[self._rows])])
        self._step += 1
        self._rows_drawn += picked.sum(axis=0)
        valid = np.full(len(rows), length)
        return pack(rows, valid, self.vocabulary.eos_id), choices[self._rows]

    def get_state(self) -> dict:
        """The stream's position: JSON-serialisable, independent of the process count."""
        return {"version": _STATE_VERSION, "seed": self.seed,
                "sequence_length": self.sequence_length, "step": self._step,
                "rows_drawn": {t.name: int(n) for t, n in zip(self.tasks, self._rows_drawn)}}

    def set_state(self, state: Mapping) -> None:
        """Continues from a `get_state()`: the next batch is the one that would have come next."""
        expected = {"version": _STATE_VERSION, "seed": self.seed,
                    "sequence_length": self.sequence_length}
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
        self._step = int(state["step"])
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
                batch_size: int, seed: int = 42, process_index: int | None = None,
                process_count: int | None = None) -> PackedStream:
    """The `roots` mixture as an endless stream of packed batches for this process.

    `batch_size` is global, in sequences; this process gets batch_size / process_count rows.
    `data_dir` None reads the default corpus; `vocabulary` is a Vocabulary, a file path, or None
    (the shipped SentencePiece model). Process index and count default to JAX's. Mixture knobs:
    `roots_tasks.languages_subset`, `mixture_rates.rates`, `mixture_rates.alpha`.
    Gin: `make_stream.data_dir = "/data/roots"`, `make_stream.seed = 42`.
    """
    vocabulary = as_vocabulary(vocabulary)
    seqio_tasks, loaded = tokenized.load_tasks(split, data_dir, vocabulary)
    rates = languages.mixture_rates({t.name: t.num_tokens for t in loaded})
    tasks_lib.roots_mixture(seqio_tasks, rates)
    return PackedStream(loaded, rates, vocabulary,
                        sequence_length=sequence_length, batch_size=batch_size, seed=seed,
                        process_index=process_index, process_count=process_count)


class ValidationBatches:
    """One pass over a task's validation documents in file order, as packed batches.

    The last row and the last batch are padded (segment 0, loss weight 0) so shapes stay fixed.
    """

    def __init__(self, task: tokenized.TokenizedTask, vocabulary: seqio.Vocabulary, *,
                 sequence_length: int, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None):
        self.task = task
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

    def __iter__(self) -> Iterator[Batch]:
        for batch in range(len(self)):
            row_ids = np.arange(batch * self._batch_size,
                                (batch + 1) * self._batch_size)[self._rows]
            rows = np.zeros([len(row_ids), self._length + 1], np.int32)
            valid = np.zeros([len(row_ids)], np.int64)
            for i, row in enumerate(row_ids):
                window = self.task.tokens[row * self._length:row * self._length + self._length + 1]
                rows[i, :len(window)] = window
                valid[i] = max(len(window) - 1, 0)
            yield pack(rows, valid, self.vocabulary.eos_id)


@gin.configurable
def validation_streams(*, data_dir: str | pathlib.Path | None = None,
                       vocabulary: seqio.Vocabulary | str | None = None,
                       sequence_length: int = 2048, batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> dict[str, ValidationBatches]:
    """Per task, a finite, re-iterable sequence of validation batches for this process."""
    vocabulary = as_vocabulary(vocabulary)
    return {task.name: ValidationBatches(task, vocabulary, sequence_length=sequence_length,
                                         batch_size=batch_size, process_index=process_index,
                                         process_count=process_count)
            for task in tokenized.load_tasks("validation", data_dir, vocabulary)[1]}
