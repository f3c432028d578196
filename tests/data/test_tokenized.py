"""Tokenized tasks and their on-disk cache."""

import time

import numpy as np

from bloom_jax.data import tokenized
from tests.data.helpers import write_jsonl


def _load(corpus, vocabulary, cache_dir):
    return {t.name: t for t in tokenized.load_tasks("train", corpus, vocabulary, cache_dir)[1]}


def test_cache_holds_the_same_tokens_and_is_memory_mapped(tiny_corpus, vocabulary, tmp_path):
    fresh = _load(tiny_corpus, vocabulary, None)
    written = _load(tiny_corpus, vocabulary, tmp_path / "cache")
    read = _load(tiny_corpus, vocabulary, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("roots_en.train.*.tokens.npy"))) == 1
    for name, task in fresh.items():
        for other in (written[name], read[name]):
            np.testing.assert_array_equal(other.tokens, task.tokens)
            np.testing.assert_array_equal(other.starts, task.starts)
    assert isinstance(read["roots_en"].tokens, np.memmap)


def test_changed_corpus_is_tokenized_again(tiny_corpus, vocabulary, tmp_path):
    before = _load(tiny_corpus, vocabulary, tmp_path / "cache")["roots_en"]
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_jsonl(tiny_corpus / "en.jsonl", ["Only one document now."])
    after = _load(tiny_corpus, vocabulary, tmp_path / "cache")["roots_en"]
    assert before.num_documents > 1 and after.num_documents == 1
    assert len(list((tmp_path / "cache").glob("roots_en.train.*.tokens.npy"))) == 2
