"""Shared fixtures: the default corpus tokenized once per session, and tiny corpora in tmp_path."""

import pytest
import tokenizers

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


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """A small byte-level BPE saved like BLOOM's: <unk>=0, <s>=1, </s>=2, <pad>=3."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    texts = ["Hello world, rivers and forests."] * 20 + ["héllo 世界"]
    tokenizer.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path
