"""Tasks tokenized into one token array each, optionally cached on disk as memory-mapped .npy.

The cache is keyed by a fingerprint of the task's files (paths, sizes, modification times), the
split rule and the vocabulary file, so a changed corpus or vocabulary is tokenized again. Many
processes on one host share a cached task through the page cache instead of each holding a copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import gin
import numpy as np
import seqio

from bloom_jax.data import documents
from bloom_jax.data import tasks as tasks_lib
from bloom_jax.data import vocabularies


@dataclasses.dataclass(frozen=True)
class TokenizedTask:
    """One task's documents, tokenized and closed by EOS, concatenated in file order."""

    name: str
    tokens: np.ndarray  # [total_tokens] int32
    starts: np.ndarray  # [documents + 1] int64, document d is tokens[starts[d]:starts[d + 1]]

    @property
    def num_documents(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_task(cls, task: seqio.Task, split: str) -> "TokenizedTask":
        pieces = list(tasks_lib.encoded_documents(task, split))
        lengths = np.array([len(p) for p in pieces], np.int64)
        tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros([0], np.int32)
        return cls(task.name, tokens, np.concatenate([[0], np.cumsum(lengths)]))


def _fingerprint(task: seqio.Task, split: str) -> str:
    """A digest of everything the task's tokens depend on."""
    source = task.source
    vocabulary = task.output_features["targets"].vocabulary
    files = sorted({*documents.language_files(source.data_dir, source.language, "train"),
                    *documents.language_files(source.data_dir, source.language, "validation")})
    digest = hashlib.sha256(json.dumps(
        [split, source.validation_fraction, vocabularies.vocabulary_file(vocabulary),
         [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]).encode())
    vocabulary_path = pathlib.Path(vocabularies.vocabulary_file(vocabulary))
    if vocabulary_path.is_file():
        digest.update(vocabulary_path.read_bytes())
    return digest.hexdigest()[:16]


def _cached(task: seqio.Task, split: str, cache_dir: pathlib.Path) -> TokenizedTask:
    """The task's tokens from `cache_dir`, tokenizing and writing them first if absent."""
    stem = cache_dir / f"{task.name}.{split}.{_fingerprint(task, split)}"
    paths = {key: stem.with_name(f"{stem.name}.{key}.npy") for key in ("tokens", "starts")}
    if not all(p.is_file() for p in paths.values()):
        result = TokenizedTask.from_task(task, split)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for key, path in paths.items():
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            with open(partial, "wb") as f:
                np.save(f, getattr(result, key))
            os.replace(partial, path)  # atomic: concurrent processes never read a half-written file
    return TokenizedTask(task.name, np.load(paths["tokens"], mmap_mode="r"),
                         np.load(paths["starts"]))


@gin.configurable
def load_tasks(split: str, data_dir: str | pathlib.Path | None, vocabulary: seqio.Vocabulary,
               cache_dir: str | pathlib.Path | None = None
               ) -> tuple[dict[str, seqio.Task], list[TokenizedTask]]:
    """The ROOTS tasks present in `data_dir` and their non-empty tokenized `split`.

    `cache_dir` keeps the tokens on disk between runs. See `tasks.roots_tasks` for the gin knobs
    that choose languages. Gin: `load_tasks.cache_dir = "/data/roots_tokens"`.
    """
    found = tasks_lib.roots_tasks(data_dir=data_dir, vocabulary=vocabulary)
    tokenized = [_cached(task, split, pathlib.Path(cache_dir)) if cache_dir
                 else TokenizedTask.from_task(task, split) for task in found.values()]
    for task in tokenized:
        logging.info("%s/%s: %d documents, %d tokens.", task.name, split, task.num_documents,
                     task.num_tokens)
    empty = [t.name for t in tokenized if t.num_tokens == 0]
    if empty:
        logging.warning("Tasks with no %s documents are left out: %s", split, ", ".join(empty))
    return found, [t for t in tokenized if t.num_tokens]
