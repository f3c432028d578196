"""Shared fixtures: the default corpus tokenized once per session, and tiny corpora in tmp_path."""

import pytest

from bloom_jax.data import tokenized
from bloom_jax.data import vocabularies
from tests.data.helpers import write_jsonl


@pytest.fixture(scope="session")
def vocabulary():
    return vocabularies.load_vocabulary()


@pytest.fixture(scope="session")
def loaded_train(vocabulary):
    """The default corpus's seqio tasks and train split, tokenized once per session."""
    return tokenized.load_tasks("train", None, vocabulary)


@pytest.fixture(scope="session")
def train_tasks(loaded_train):
    """The default corpus's train split, tokenized."""
    return loaded_train[1]


@pytest.fixture(scope="session")
def seqio_tasks(loaded_train):
    """The default corpus's seqio tasks, by name."""
    return loaded_train[0]


@pytest.fixture
def tiny_corpus(tmp_path):
    """English and French in the two layouts a corpus may use (file and folder)."""
    write_jsonl(tmp_path / "en.jsonl", [f"English document number {i}." for i in range(40)])
    write_jsonl(tmp_path / "fr" / "part-0.jsonl", [f"Document français {i}." for i in range(20)])
    write_jsonl(tmp_path / "fr" / "validation" / "part-0.jsonl", ["Une phrase de validation."])
    return tmp_path
