"""Tasks as token arrays read from a token store (`store.py`), which is written once per corpus.

With TOKENS_DIR, the store `python -m bloom_jax.data.prepare` wrote is read; the corpus is not.
Without it, DATA_DIR is tokenized once into a store under MODEL_DIR/tokens: the first process
to take the store's lock writes it and the others wait, then read it; a change of corpus or
vocabulary rewrites the shards it touches. Without a MODEL_DIR (the data tools, evaluate) the
store goes to a temporary folder that lives as long as the process.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import gin
import seqio

from bloom_jax.data import builder
from bloom_jax.data import store
from bloom_jax.data import tasks as tasks_lib
from bloom_jax.data import vocabularies

_TEMPORARY_STORES: dict[tuple[str, str], pathlib.Path] = {}  # (data_dir, vocabulary) -> root


@dataclasses.dataclass(frozen=True)
class TokenizedTask:
    """One task's documents, tokenized and closed by EOS, concatenated in file order."""

    name: str
    tokens: Any  # [total_tokens] int32 ids: an array or a store's lazily read `store.Tokens`
    starts: Any  # [documents + 1] int64, document d is tokens[starts[d]:starts[d + 1]]
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)  # bad input, by reason

    @property
    def num_documents(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@gin.configurable
def load_tasks(split: str, data_dir: str | pathlib.Path | None, vocabulary: seqio.Vocabulary,
               tokens_dir: str | pathlib.Path | None = None,
               model_dir: str | pathlib.Path | None = None
               ) -> tuple[dict[str, seqio.Task], list[TokenizedTask]]:
    """The ROOTS tasks and their non-empty tokenized `split`, read from a token store.

    tokens_dir: a store written by `python -m bloom_jax.data.prepare` (then `data_dir` is not
    read). None: `data_dir` is tokenized once into `model_dir`/tokens (see the module's
    docstring). `tasks.roots_tasks` has the gin knobs that choose languages.
    Gin (base.gin): `load_tasks.tokens_dir = %TOKENS_DIR`, `load_tasks.model_dir = %MODEL_DIR`.
    """
    if tokens_dir:
        root = pathlib.Path(tokens_dir)
        manifest = store.open_manifest(root)
        store.check_vocabulary(root, manifest, vocabularies.vocabulary_file(vocabulary))
        found = tasks_lib.roots_tasks(
            data_dir=manifest["data_dir"], vocabulary=vocabulary,
            present=[task["language"] for task in manifest["tasks"].values()])
        _check_settings(root, manifest, found)
    else:
        found = tasks_lib.roots_tasks(data_dir=data_dir, vocabulary=vocabulary)
        root = pathlib.Path(model_dir) / "tokens" if model_dir else _temporary_root(
            found, vocabulary)
        # One process: the batched encoder on every core (prepare runs many).
        manifest = builder.build(root, found, vocabulary, workers=1)
    tokenized = [TokenizedTask(name, *store.split_arrays(root, manifest, name, split),
                               skipped=store.bad_records(manifest, name)) for name in found]
    for task in tokenized:
        logging.info("%s/%s: %d documents, %d tokens.", task.name, split, task.num_documents,
                     task.num_tokens)
    empty = [t.name for t in tokenized if t.num_tokens == 0]
    if empty:
        logging.warning("Tasks with no %s documents are left out: %s", split, ", ".join(empty))
    return found, [t for t in tokenized if t.num_tokens]


def _check_settings(root: pathlib.Path, manifest: Mapping, found: Mapping[str, seqio.Task]):
    """Raises if the config holds out another validation fraction than the store did."""
    for name, task in found.items():
        made_with = manifest["tasks"][name]["validation_fraction"]
        if task.source.validation_fraction != made_with:
            raise store.StoreError(
                f"Token store {root} held out validation_fraction {made_with} of {name}, the "
                f"config {task.source.validation_fraction}: set roots_tasks.validation_fraction "
                f"= {made_with}, or prepare the store again with the config's.")


def _temporary_root(found: Mapping[str, seqio.Task], vocabulary: seqio.Vocabulary
                    ) -> pathlib.Path:
    """This process's store of a corpus and vocabulary when there is no MODEL_DIR."""
    source = next(iter(found.values())).source
    key = (str(source.data_dir), vocabularies.vocabulary_file(vocabulary))
    if key not in _TEMPORARY_STORES:
        root = pathlib.Path(tempfile.mkdtemp(prefix="bloom_jax_tokens_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _TEMPORARY_STORES[key] = root
    return _TEMPORARY_STORES[key]
