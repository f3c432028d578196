"""Vocabulary files opened without seqio: the same ids and texts as seqio's vocabularies of the
same files, and clear errors for files that are missing, of another kind or unreadable."""

import pytest

from bloom_jax.data import vocabularies
from bloom_jax.data import vocabulary_files

TEXTS = ["Hello rivers, ünseen 🙂", "河流用耐心塑造大地。", "def f(x):\n    return x"]


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer_json"])
def test_encodes_and_decodes_as_the_seqio_vocabulary_of_the_file(kind, tokenizer_json):
    path = tokenizer_json if kind == "tokenizer_json" else None
    file, seqio_vocabulary = (vocabulary_files.open_vocabulary(path),
                              vocabularies.load_vocabulary(path))
    assert ((file.vocab_size, file.eos_id, file.unk_id, file.pad_id)
            == (seqio_vocabulary.vocab_size, seqio_vocabulary.eos_id, seqio_vocabulary.unk_id,
                seqio_vocabulary.pad_id))
    assert file.encode_batch(TEXTS, threads=2) == [seqio_vocabulary.encode(t) for t in TEXTS]
    for text in TEXTS:
        ids = file.encode(text)
        assert file.decode(ids) == text
        # Past the first EOS nothing is decoded; an id past the vocabulary reads as unknown.
        tail = ids + [file.vocab_size + 5, file.eos_id] + ids
        assert file.decode(tail) == seqio_vocabulary.decode(tail)
        assert file.decode(tail).startswith(text) and file.decode(tail) != file.decode(ids + ids)


def test_missing_unknown_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model does not exist"):
        vocabulary_files.open_vocabulary(tmp_path / "nope.model")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt: expected"):
        vocabulary_files.open_vocabulary(tmp_path / "vocab.txt")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model is not a readable SentencePiece model"):
        vocabulary_files.open_vocabulary(tmp_path / "bad.model")
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable Hugging Face"):
        vocabulary_files.open_vocabulary(tmp_path / "tokenizer.json")


def test_a_tokenizer_json_without_an_eos_token_is_refused(tmp_path, tokenizer_json):
    text = tokenizer_json.read_text().replace('"</s>"', '"</eos>"')
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match="has no '</s>' token"):
        vocabulary_files.open_vocabulary(tmp_path / "tokenizer.json")


def test_model_too_small_for_vocabulary_names_the_file_and_the_size_to_set():
    file = vocabulary_files.open_vocabulary()
    vocabulary_files.check_fits_model(file.vocab_size, file.path, 1024)
    with pytest.raises(ValueError, match="sentencepiece.model has 1024 ids.*vocab_size = 1024"):
        vocabulary_files.check_fits_model(file.vocab_size, file.path, 1000)
