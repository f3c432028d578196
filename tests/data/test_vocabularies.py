"""seqio Vocabularies: the shipped SentencePiece model, a tokenizer.json, padding and model
checks."""

import numpy as np
import pytest
import tensorflow as tf

from bloom_jax.data import tasks
from bloom_jax.data import vocabularies
from tests.data.helpers import seqio_documents
from tests.data.helpers import write_jsonl


def test_default_vocabulary_round_trips_any_text_with_byte_fallback(vocabulary):
    assert (vocabulary.vocab_size, vocabulary.eos_id, vocabulary.pad_id) == (1024, 1, 0)
    texts = ["Rivers shape the land.", "河流用耐心塑造大地。", "Ωμέγα 🙂 ḱ", "def f(x):\n    return x"]
    for text in texts:
        ids = vocabulary.encode(text)
        assert vocabulary.unk_id not in ids
        assert vocabulary.decode(ids) == text


def test_model_too_small_for_vocabulary_names_the_file(vocabulary):
    vocabularies.check_fits_model(vocabulary, 1024)
    with pytest.raises(ValueError, match="sentencepiece.model has 1024 ids.*vocab_size = 1024"):
        vocabularies.check_fits_model(vocabulary, 1000)


def test_tokenizer_json_vocabulary(tokenizer_json):
    vocabulary = vocabularies.load_vocabulary(tokenizer_json)
    assert isinstance(vocabulary, vocabularies.TokenizerJsonVocabulary)
    assert (vocabulary.eos_id, vocabulary.unk_id, vocabulary.pad_id) == (2, 0, 3)
    text = "Hello rivers, ünseen 🙂"
    ids = vocabulary.encode(text)
    assert vocabulary.decode(ids) == text == vocabulary.decode(np.asarray(ids))
    np.testing.assert_array_equal(vocabulary.encode_tf(tf.constant(text)).numpy(), ids)
    assert vocabulary.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == text


def test_tokenizer_json_vocabulary_in_a_task(tmp_path, tokenizer_json):
    vocabulary = vocabularies.load_vocabulary(tokenizer_json)
    write_jsonl(tmp_path / "en.jsonl", ["Hello world.", "Forests and rivers."])
    found = tasks.roots_tasks(data_dir=tmp_path, vocabulary=vocabulary, validation_fraction=0.0)
    docs = seqio_documents(found["roots_en"], "train")
    assert [vocabulary.decode(d[:-1]) for d in docs] == ["Hello world.", "Forests and rivers."]
    assert all(d[-1] == 2 for d in docs)
    assert [d.tolist() for d in tasks.encoded_documents(found["roots_en"], "train")] == docs
