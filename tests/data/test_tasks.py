"""seqio tasks per language found in a corpus, and the `roots` mixture."""

import logging
import os

import numpy as np
import pytest
import seqio

from bloom_jax.data import tasks
from tests.data.helpers import seqio_documents
from tests.data.helpers import write_jsonl


def test_one_task_per_present_language_and_absent_ones_warned(tiny_corpus, vocabulary, caplog):
    with caplog.at_level(logging.WARNING):
        found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)
    assert sorted(found) == ["roots_en", "roots_fr"]
    assert "57 ROOTS languages have no files" in caplog.text
    assert "zh-Hant" in caplog.text and "code/python" in caplog.text


def test_languages_subset(tiny_corpus, vocabulary):
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary,
                              languages_subset=["fr", "es"])
    assert list(found) == ["roots_fr"]


def test_no_language_present_is_a_clear_error(tmp_path, vocabulary):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match=f"No ROOTS language found in {tmp_path}"):
        tasks.roots_tasks(data_dir=tmp_path, vocabulary=vocabulary)


def test_missing_data_dir_names_it(tmp_path, vocabulary):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        tasks.roots_tasks(data_dir=tmp_path / "nope", vocabulary=vocabulary)


@pytest.mark.parametrize("folder", ["", "fr"])
def test_unreadable_folder_is_an_error_naming_it(tiny_corpus, vocabulary, monkeypatch, folder):
    unreadable = tiny_corpus / folder
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != unreadable and real_access(p, mode))
    with pytest.raises(PermissionError, match=f"Cannot read corpus folder {unreadable}:"):
        tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)


def test_documents_are_tokenized_with_eos_and_split(tiny_corpus, vocabulary):
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary,
                              validation_fraction=0.25)
    fr_valid = seqio_documents(found["roots_fr"], "validation")
    assert [vocabulary.decode(d[:-1]) for d in fr_valid] == ["Une phrase de validation."]
    assert all(d[-1] == vocabulary.eos_id for d in fr_valid)
    en_train = seqio_documents(found["roots_en"], "train")
    en_valid = seqio_documents(found["roots_en"], "validation")
    assert len(en_train) + len(en_valid) == 40 and 0 < len(en_valid) < 20
    train_texts = {vocabulary.decode(d[:-1]) for d in en_train}
    assert not train_texts & {vocabulary.decode(d[:-1]) for d in en_valid}


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_bulk_encoding_equals_the_seqio_preprocessors(tiny_corpus, vocabulary, split):
    for task in tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary).values():
        bulk = [d.tolist() for d in tasks.encoded_documents(task, split)]
        assert bulk == seqio_documents(task, split) and bulk


def test_skipped_input_is_logged_per_task(tmp_path, vocabulary, caplog):
    path = write_jsonl(tmp_path / "sw.jsonl", ["Habari ya asubuhi."])
    path.write_text(path.read_text() + "{not json\n")
    found = tasks.roots_tasks(data_dir=tmp_path, vocabulary=vocabulary)
    with caplog.at_level(logging.WARNING):
        assert len(list(tasks.encoded_documents(found["roots_sw"], "train"))) == 1
    assert "roots_sw/train: read 1 documents from 1 files; skipped: 1 malformed JSON lines" in (
        caplog.text)


def test_roots_mixture_is_registered_with_rates(tiny_corpus, vocabulary):
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)
    tasks.roots_mixture(found, {"roots_en": 0.9, "roots_fr": 0.1})
    mixture = seqio.get_mixture_or_task("roots")
    assert mixture.get_rate(seqio.get_mixture_or_task("roots_fr")) == 0.1
    assert np.isclose(sum(mixture.get_rate(t) for t in mixture.tasks), 1.0)
