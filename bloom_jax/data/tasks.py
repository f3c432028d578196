"""seqio Tasks for the ROOTS languages found in a corpus folder, and the `roots` Mixture.

Each language of the ROOTS table that has files under `data_dir` becomes the Task
`roots_<directory>` (`roots_en`, `roots_zh_hant`, `roots_code_python`): documents are tokenized
and closed with EOS. The Mixture `roots` weights them by BLOOM's shares, by explicit rates, or by
their token counts raised to `alpha`; see `mixture_rates`.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import Iterator, Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from bloom_jax.data import documents
from bloom_jax.data import languages
from bloom_jax.data import vocabularies

MIXTURE_NAME = "roots"
SPLITS = ("train", "validation")
# In the default corpus, the Python task reads the package's own sources.
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_CORPUS_SOURCES = {"code/python": _PACKAGE_DIR}


def resolve_data_dir(data_dir: str | pathlib.Path | None) -> pathlib.Path:
    """`data_dir` as a checked path; None means the default corpus shipped with the package."""
    path = pathlib.Path(data_dir) if data_dir else documents.DEFAULT_CORPUS_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"Corpus folder {path} does not exist; set DATA_DIR (--gin.DATA_DIR=... for the "
            "trainer, --data_dir for the data tools) to a ROOTS-style folder "
            "(<data_dir>/<language>.jsonl or <data_dir>/<language>/*.jsonl|*.parquet).")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"Cannot read corpus folder {path}: check its permissions.")
    return path


def language_files(data_dir: pathlib.Path, language: languages.Language,
                   split: str) -> list[pathlib.Path]:
    """The files of one language and split, including the package sources in the default corpus."""
    files = documents.language_files(data_dir, language, split)
    extra = _DEFAULT_CORPUS_SOURCES.get(language.directory)
    if extra and data_dir.resolve() == documents.DEFAULT_CORPUS_DIR.resolve():
        files += sorted(f for f in extra.rglob("*.py") if f.stat().st_size)  # not empty __init__
    return files


def language_documents(data_dir: pathlib.Path, language: languages.Language, split: str,
                       validation_fraction: float) -> Iterator[str]:
    """The texts of one language and split in file order; skipped input is counted and logged."""
    held_out_by_hash = not documents.has_validation_dir(data_dir, language)
    files = language_files(data_dir, language, "train" if held_out_by_hash else split)
    want_held_out = split == "validation"
    skipped = documents.Skipped()
    count = 0
    for text in documents.read_documents(files, skipped):
        if held_out_by_hash and documents.is_held_out(text, validation_fraction) != want_held_out:
            continue
        count += 1
        yield text
    log = logging.warning if skipped else logging.info
    log("%s/%s: read %d documents from %d files; skipped: %s.", language.task_name, split, count,
        len(files), skipped.summary())


class RootsSource(seqio.FunctionDataSource):
    """One language's documents: a seqio source of `{"text": string}`, and a Python iterator."""

    def __init__(self, data_dir: pathlib.Path, language: languages.Language,
                 validation_fraction: float):
        self.data_dir = data_dir
        self.language = language
        self.validation_fraction = validation_fraction
        super().__init__(self._dataset, splits=SPLITS)

    def documents(self, split: str) -> Iterator[str]:
        return language_documents(self.data_dir, self.language, split, self.validation_fraction)

    def _dataset(self, split: str, shuffle_files: bool) -> tf.data.Dataset:
        del shuffle_files  # order is fixed here; the packed stream shuffles with its own seed
        return tf.data.Dataset.from_generator(
            lambda: ({"text": text} for text in self.documents(split)),
            output_signature={"text": tf.TensorSpec([], tf.string)})


def make_task(data_dir: pathlib.Path, language: languages.Language,
              vocabulary: seqio.Vocabulary, validation_fraction: float) -> seqio.Task:
    """The seqio Task of one language: documents -> token ids closed by EOS, in `targets`."""
    return seqio.Task(
        language.task_name,
        source=RootsSource(data_dir, language, validation_fraction),
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.preprocessors.append_eos,
        ],
        shuffle_buffer_size=None)


@gin.configurable
def roots_tasks(data_dir: str | pathlib.Path | None = None,
                vocabulary: seqio.Vocabulary | None = None,
                languages_subset: Sequence[str] | None = None,
                validation_fraction: float = 0.05) -> dict[str, seqio.Task]:
    """One Task per ROOTS language present in `data_dir` (all of the table, or `languages_subset`).

    Languages without files are dropped with a warning listing them; none present is an error.
    `validation_fraction` of each language's documents is held out when it has no `validation/`
    folder. Gin: `roots_tasks.languages_subset = ["en", "fr", "code/python"]`.
    """
    data_dir = resolve_data_dir(data_dir)
    vocabulary = vocabulary or vocabularies.load_vocabulary()
    wanted = ([languages.lookup(key) for key in languages_subset] if languages_subset
              else list(languages.LANGUAGES))
    present = [lang for lang in wanted if language_files(data_dir, lang, "train")]
    absent = [lang.directory for lang in wanted if lang not in present]
    if not present:
        raise FileNotFoundError(
            f"No ROOTS language found in {data_dir}: expected files such as "
            f"{data_dir}/en.jsonl or {data_dir}/en/*.jsonl (or .parquet) for the languages "
            f"{', '.join(lang.directory for lang in wanted)}.")
    if absent:
        logging.warning("%d ROOTS languages have no files in %s and are dropped (their share is "
                        "spread over the others): %s", len(absent), data_dir, ", ".join(absent))
    return {lang.task_name: make_task(data_dir, lang, vocabulary, validation_fraction)
            for lang in present}


@gin.configurable
def mixture_rates(sizes: Mapping[str, float], rates: Mapping[str, float] | None = None,
                  alpha: float | None = None) -> dict[str, float]:
    """Normalized sampling rates for the tasks in `sizes` (task name -> tokens or bytes).

    Default: BLOOM's shares. `rates`: explicit weights keyed by directory or task name (tasks
    without one are left out). `alpha`: weight = size ** alpha (1 = proportional, < 1 up-samples
    small languages). Gin: `mixture_rates.alpha = 0.3` or `mixture_rates.rates = {"en": 2, ...}`.
    """
    if rates is not None and alpha is not None:
        raise ValueError("Give mixture_rates either `rates` or `alpha`, not both.")
    if rates is not None:
        by_task = {languages.lookup(key).task_name: float(rate) for key, rate in rates.items()}
        missing = sorted(set(by_task) - set(sizes))
        if missing:
            logging.warning("Rates given for tasks with no data, dropped: %s", ", ".join(missing))
        weights = {name: by_task.get(name, 0.0) for name in sizes}
    elif alpha is not None:
        weights = {name: float(size) ** alpha if size > 0 else 0.0 for name, size in sizes.items()}
    else:
        weights = {name: languages.BY_TASK_NAME[name].share for name in sizes}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"Mixture rates must be non-negative with a positive sum; got {weights}.")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items() if w > 0}


def roots_mixture(tasks: Mapping[str, seqio.Task], rates: Mapping[str, float]) -> seqio.Mixture:
    """Registers the tasks and the `roots` Mixture with `rates`, replacing earlier registrations."""
    for name, task in tasks.items():
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add_provider(name, task)
    seqio.MixtureRegistry.remove(MIXTURE_NAME)
    mixture = seqio.Mixture(MIXTURE_NAME, [(tasks[name], rate) for name, rate in rates.items()])
    seqio.MixtureRegistry.add_provider(MIXTURE_NAME, mixture)
    return mixture


def encoded_documents(task: seqio.Task, split: str) -> Iterator[np.ndarray]:
    """The task's documents as int32 ids closed by EOS, in file order.

    The same ids as `task.get_dataset(split)` (its tokenize and append_eos preprocessors), but
    encoded in Python without tf.data's per-example overhead: about 50 times faster.
    """
    vocabulary = task.output_features["targets"].vocabulary
    for text in task.source.documents(split):
        yield np.array([*vocabulary.encode(text), vocabulary.eos_id], np.int32)
