"""Hugging Face tokenizer files of a vocabulary: the same ids and text as the vocabulary itself."""

import json

import pytest
import transformers

from bloom_jax.data import documents, hf_tokenizer, vocabulary_files

# Texts SentencePiece treats specially: leading, repeated and trailing spaces, newlines, digits
# (split one by one), bytes outside the pieces (byte fallback), a lone "▁".
EDGE_CASES = ["  leading spaces", "a  b   c ", "\n\nx\ty", "123 4567 ab12", "▁odd", " ", "",
              "émoji 🤖 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


def corpus_texts():
    paths = sorted(documents.DEFAULT_CORPUS_DIR.rglob("*.jsonl"))
    return [json.loads(line)["text"] for path in paths for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    vocabulary = vocabulary_files.open_vocabulary()
    ids = hf_tokenizer.write_tokenizer_files(vocabulary, directory)
    return vocabulary, ids, transformers.AutoTokenizer.from_pretrained(directory)


def test_sentencepiece_export_encodes_and_decodes_as_sentencepiece(exported):
    vocabulary, _, tokenizer = exported
    texts = corpus_texts() + EDGE_CASES
    assert len(texts) > 50
    for text in texts:
        ids = vocabulary.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == vocabulary.decode(ids), text


def test_special_tokens_are_the_vocabulary_s(exported):
    vocabulary, ids, tokenizer = exported
    assert ids == {"bos_token_id": None, "eos_token_id": vocabulary.eos_id,
                   "pad_token_id": vocabulary.pad_id, "unk_token_id": vocabulary.unk_id}
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        vocabulary.eos_id, vocabulary.pad_id, vocabulary.unk_id)
    assert tokenizer.padding_side == "left"


def test_tokenizer_json_is_copied(tmp_path):
    source = tmp_path / "tokenizer.json"
    source.write_text(hf_tokenizer.tokenizer_json(vocabulary_files.open_vocabulary()))
    (tmp_path / "out").mkdir()
    hf_tokenizer.write_tokenizer_files(vocabulary_files.open_vocabulary(source), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == source.read_text()
