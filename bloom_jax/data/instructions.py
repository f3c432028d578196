"""Instruction fine-tuning data: JSONL of {"inputs": ..., "targets": ...} (xP3's format) as a
deterministic, resumable stream of batches whose loss is on the targets only.

Each example is `inputs + targets + EOS`, the two tokenized separately and concatenated (no
separator, no BOS), as a prompt is fed at inference. It is scored on its targets and EOS only:
the loss weight of a position is 1 where the token it predicts belongs to the targets (with
`norm_target_loss`, 1 / the example's target tokens, so that every target weighs the same).
An example longer than a row loses the start of its inputs (then of its targets).

Examples are read in epochs, each a fresh permutation drawn from the seed. With packing (BLOOMZ's
choice) a row holds as many whole examples as fit, in stream order, each its own segment (tokens
attend only inside their example, positions restart at 0); otherwise each row holds one example.
The rest of a row is padding (segment 0, loss weight 0). A batch is therefore a pure function of
(seed, examples consumed), and those few integers are the stream's whole state.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Iterator, Mapping

import gin
import numpy as np
import seqio
from absl import logging

from bloom_jax.data import documents, packing, pipeline

_STATE_VERSION = 1
FIELDS = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized examples: example i is tokens[starts[i]:starts[i + 1]], of which the first
    `prompt_lengths[i]` are its inputs."""

    tokens: np.ndarray  # [total tokens] int32
    starts: np.ndarray  # [examples + 1] int64
    prompt_lengths: np.ndarray  # [examples] int64

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i]:self.starts[i + 1]]

    def fitted(self, i: int, length: int) -> tuple[np.ndarray, int]:
        """Example i's last `length + 1` tokens (a row's inputs and targets), and how many of
        them are its prompt."""
        sequence = self.sequence(i)
        cut = max(len(sequence) - (length + 1), 0)
        return sequence[cut:], max(int(self.prompt_lengths[i]) - cut, 0)


def jsonl_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """`path` itself if a file, else the `*.jsonl` files under it, sorted."""
    path = pathlib.Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"No instruction data at {path}: set SFT_DATA (--gin.SFT_DATA=...) to a JSONL file, or "
            'a folder of them, with one {"inputs": ..., "targets": ...} object per line.')
    return files


def tokenize_examples(path: str | pathlib.Path, vocabulary: seqio.Vocabulary) -> Examples:
    """Every well-formed example under `path`, tokenized; bad lines and examples with empty
    targets are skipped, counted and logged."""
    files = jsonl_files(path)
    skipped = documents.Skipped()
    sequences, prompt_lengths = [], []
    for file in files:
        for inputs, targets in documents.jsonl_records(file, FIELDS, skipped):
            if not targets:
                skipped["examples with empty targets"] += 1
                continue
            prompt = vocabulary.encode(inputs)
            sequences.append([*prompt, *vocabulary.encode(targets), vocabulary.eos_id])
            prompt_lengths.append(len(prompt))
    (logging.warning if skipped else logging.info)(
        "%s: %d examples from %d files; skipped: %s.", path, len(sequences), len(files),
        skipped.summary())
    if not sequences:
        raise ValueError(f"{path} holds no usable example (skipped: {skipped.summary()}); each "
                         'line must be {"inputs": "...", "targets": "..."} with non-empty targets.')
    lengths = np.array([len(s) for s in sequences], np.int64)
    return Examples(np.concatenate(sequences).astype(np.int32),
                    np.concatenate([[0], np.cumsum(lengths)]), np.array(prompt_lengths, np.int64))


def fill_row(examples: list[tuple[np.ndarray, int]], length: int,
             norm_target_loss: bool = False) -> dict[str, np.ndarray]:
    """Batch features [length] of whole examples (sequence, prompt length) laid end to end.

    A target token's loss weight is 1, or 1 / (its example's target tokens) with
    `norm_target_loss`, so that every example's target weighs the same.
    """
    row = {name: np.zeros(length, dtype) for name, dtype in packing.BATCH_FEATURES.items()}
    offset = 0
    for segment, (sequence, prompt_length) in enumerate(examples, start=1):
        n = len(sequence) - 1  # positions: each predicts the next token
        span = slice(offset, offset + n)
        row["input_ids"][span] = sequence[:-1]
        row["targets"][span] = sequence[1:]
        row["segment_ids"][span] = segment
        row["positions"][span] = np.arange(n)
        scored = np.arange(1, n + 1) >= prompt_length
        row["loss_weights"][span] = scored / scored.sum() if norm_target_loss else scored
        offset += n
    return row


class InstructionStream:
    """Endless iterator of batches of instruction examples, with a small exact JSON state."""

    def __init__(self, examples: Examples, vocabulary: seqio.Vocabulary, *,
                 sequence_length: int, batch_size: int, seed: int, packing: bool = True,
                 norm_target_loss: bool = False, process_index: int | None = None,
                 process_count: int | None = None):
        self.examples = examples
        self.vocabulary = vocabulary
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.seed = seed
        self.packing = packing
        self.norm_target_loss = norm_target_loss
        self._rows = pipeline.process_rows(batch_size, process_index, process_count)
        self._consumed = 0  # examples taken from the endless, epoch by epoch, stream
        self._order = functools.lru_cache(maxsize=2)(self._epoch_order)

    def __iter__(self) -> Iterator[packing.Batch]:
        return self

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))

    def _example(self, k: int) -> tuple[np.ndarray, int]:
        """Example k of the endless stream, its last `sequence_length + 1` tokens: (tokens,
        prompt length)."""
        epoch, index = divmod(k, len(self.examples))
        return self.examples.fitted(self._order(epoch)[index], self.sequence_length)

    def __next__(self) -> packing.Batch:
        rows = []
        for _ in range(self.batch_size):  # every process lays out the whole global batch
            row, used = [], 0
            while True:
                example = self._example(self._consumed)
                if row and (not self.packing or used + len(example[0]) - 1 > self.sequence_length):
                    break
                row.append(example)
                used += len(example[0]) - 1
                self._consumed += 1
            rows.append(row)
        features = [fill_row(row, self.sequence_length, self.norm_target_loss)
                    for row in rows[self._rows]]
        return {name: np.stack([f[name] for f in features]) for name in packing.BATCH_FEATURES}

    def get_state(self) -> dict:
        """The stream's position: JSON-serialisable, independent of the process count."""
        return {"version": _STATE_VERSION, "seed": self.seed, "packing": self.packing,
                "sequence_length": self.sequence_length, "num_examples": len(self.examples),
                "examples_consumed": self._consumed}

    def set_state(self, state: Mapping) -> None:
        """Continues from a `get_state()`: the next batch is the one that would have come next."""
        expected = {key: value for key, value in self.get_state().items()
                    if key != "examples_consumed"}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"Saved data state has {key}={state.get(key)!r} but this stream "
                                 f"has {value!r}; resume with the same SFT_DATA, vocabulary, seed "
                                 "and packing as the saved run.")
        self._consumed = int(state["examples_consumed"])


class HeldOutBatches:
    """One pass over held-out examples in file order, packed as training packs them, with the
    loss weight on their targets (and EOS), or on their prompts (`part="prompts"`): the
    trainer's evaluation reports both, and fine-tuning should lower the first only.

    The last batch is padded with empty rows (segment 0, loss weight 0) so shapes stay fixed.
    """

    def __init__(self, examples: Examples, vocabulary: seqio.Vocabulary, *, part: str,
                 sequence_length: int, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None):
        if part not in ("targets", "prompts"):
            raise ValueError(f"part={part!r}; use 'targets' or 'prompts'.")
        self.examples, self.vocabulary, self.part = examples, vocabulary, part
        self._length, self._batch_size = sequence_length, batch_size
        self._process_rows = pipeline.process_rows(batch_size, process_index, process_count)
        self._rows: list[list[int]] = [[]]
        used = 0
        for i in range(len(examples)):
            n = len(examples.fitted(i, sequence_length)[0]) - 1
            if self._rows[-1] and used + n > sequence_length:
                self._rows.append([])
                used = 0
            self._rows[-1].append(i)
            used += n

    def __len__(self) -> int:
        return -(-len(self._rows) // self._batch_size)

    @functools.cached_property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the scored text (every example's prompt, or its target)."""
        total = 0
        for i in range(len(self.examples)):
            sequence = self.examples.sequence(i)
            prompt = int(self.examples.prompt_lengths[i])
            part = sequence[:prompt] if self.part == "prompts" else sequence[prompt:-1]
            total += len(self.vocabulary.decode(part.tolist()).encode("utf-8"))
        return total

    def __iter__(self) -> Iterator[packing.Batch]:
        for batch in range(len(self)):
            rows = self._rows[batch * self._batch_size:(batch + 1) * self._batch_size]
            rows += [[]] * (self._batch_size - len(rows))
            features = [fill_row([self.examples.fitted(i, self._length) for i in row],
                                 self._length) for row in rows[self._process_rows]]
            batch = {name: np.stack([f[name] for f in features])
                     for name in packing.BATCH_FEATURES}
            if self.part == "prompts":
                batch["loss_weights"] = ((batch["segment_ids"] > 0)
                                         & (batch["loss_weights"] == 0)).astype(np.float32)
            yield batch


@gin.configurable
def instruction_validation_streams(*, data: str | pathlib.Path | None = None,
                                   vocabulary: seqio.Vocabulary | str | None = None,
                                   sequence_length: int = 2048, batch_size: int,
                                   process_index: int | None = None,
                                   process_count: int | None = None) -> dict[str, HeldOutBatches]:
    """The held-out examples of `data` (a JSONL file or a folder of them) scored on their
    targets and, apart, on their prompts: the trainer's `eval/loss/targets` and
    `eval/loss/prompts`.

    Gin (sft.gin): `train.make_validation_streams = @instruction_validation_streams`,
    `instruction_validation_streams.data = %SFT_EVAL_DATA`.
    """
    if data is None:
        raise ValueError("SFT_EVAL_DATA is not set, and train.eval_every asks for an evaluation: "
                         "pass --gin.SFT_EVAL_DATA=/path/to/held_out.jsonl (inputs and targets "
                         "as SFT_DATA), or leave train.eval_every at 0.")
    vocabulary = pipeline.as_vocabulary(vocabulary)
    examples = tokenize_examples(data, vocabulary)
    return {part: HeldOutBatches(examples, vocabulary, part=part,
                                 sequence_length=sequence_length, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count)
            for part in ("targets", "prompts")}


@gin.configurable
def make_instruction_stream(*, data: str | pathlib.Path = gin.REQUIRED,
                            vocabulary: seqio.Vocabulary | str | None = None,
                            sequence_length: int = 2048, batch_size: int, seed: int = 42,
                            packing: bool = True, norm_target_loss: bool = False,
                            process_index: int | None = None,
                            process_count: int | None = None) -> InstructionStream:
    """The instruction examples of `data` (a JSONL file or a folder of them) as an endless
    stream of global batches of `batch_size` rows (this process gets its share).

    Gin: `make_instruction_stream.data = %SFT_DATA`, `make_instruction_stream.packing = False`
    (one example per row, padded), `make_instruction_stream.norm_target_loss = True` (every
    example's target weighs the same in the loss, as Megatron-DeepSpeed's --norm-target-loss).
    """
    if data is None:
        raise ValueError("SFT_DATA is not set: pass --gin.SFT_DATA=/path/to/xp3 (a JSONL file or "
                         'a folder of them, one {"inputs": ..., "targets": ...} per line).')
    vocabulary = pipeline.as_vocabulary(vocabulary)
    examples = tokenize_examples(data, vocabulary)
    too_long = int(np.sum(np.diff(examples.starts) > sequence_length + 1))
    if too_long:
        logging.warning("%d of %d examples are longer than %d tokens and lose the start of their "
                        "inputs.", too_long, len(examples), sequence_length + 1)
    return InstructionStream(examples, vocabulary,
                             sequence_length=sequence_length, batch_size=batch_size, seed=seed,
                             packing=packing, norm_target_loss=norm_target_loss,
                             process_index=process_index,
                             process_count=process_count)
