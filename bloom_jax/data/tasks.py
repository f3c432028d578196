"""seqio Tasks for the ROOTS languages found in a corpus folder, and the `roots` Mixture.

Each language of the ROOTS table that has files under `data_dir` becomes the Task
`roots_<directory>` (`roots_en`, `roots_zh_hant`, `roots_code_python`): documents are tokenized
and closed with EOS. The Mixture `roots` weights them by BLOOM's shares, by explicit rates, or by
their token counts raised to `alpha`; see `languages.mixture_rates`.
"""

from __future__ import annotations

import functools
import logging
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


class RootsSource(seqio.FunctionDataSource):
    """One language's documents: a seqio source of `{"text": string}`, and a Python iterator."""

    def __init__(self, data_dir: pathlib.Path, language: languages.Language,
                 validation_fraction: float):
        self.data_dir = data_dir
        self.language = language
        self.validation_fraction = validation_fraction
        super().__init__(self._dataset, splits=SPLITS)

    def documents(self, split: str) -> Iterator[str]:
        return documents.language_documents(self.data_dir, self.language, split,
                                            self.validation_fraction)

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
                validation_fraction: float = 0.05,
                present: Sequence[str] | None = None) -> dict[str, seqio.Task]:
    """One Task per ROOTS language present in `data_dir` (all of the table, or `languages_subset`).

    Languages without files are dropped with a warning listing them; none present is an error.
    `validation_fraction` of each language's documents is held out when it has no `validation/`
    folder. present: the language folders a token store holds (then `data_dir` is not read).
    Gin: `roots_tasks.languages_subset = ["en", "fr", "code/python"]`.
    """
    data_dir = (pathlib.Path(data_dir) if present is not None
                else documents.resolve_data_dir(data_dir))
    vocabulary = vocabulary or vocabularies.load_vocabulary()
    wanted = ([languages.lookup(key) for key in languages_subset] if languages_subset
              else list(languages.LANGUAGES))
    found = [lang for lang in wanted
             if (lang.directory in present if present is not None
                 else documents.language_files(data_dir, lang, "train"))]
    absent = [lang.directory for lang in wanted if lang not in found]
    if not found:
        raise FileNotFoundError(
            f"No ROOTS language found in {data_dir}: expected files such as "
            f"{data_dir}/en.jsonl or {data_dir}/en/*.jsonl (or .parquet) for the languages "
            f"{', '.join(lang.directory for lang in wanted)}.")
    if absent:
        logging.warning("%d ROOTS languages have no files in %s and are dropped (their share is "
                        "spread over the others): %s", len(absent), data_dir, ", ".join(absent))
    return {lang.task_name: make_task(data_dir, lang, vocabulary, validation_fraction)
            for lang in found}


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
