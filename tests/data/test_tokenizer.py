"""Training BLOOM's byte-level BPE (tokenizer.json) or a SentencePiece byte-fallback BPE on a
corpus, from a random sample weighted by the mixture."""

import json
import subprocess
import sys

import pytest
import tokenizers

from bloom_jax.data import tokenizer
from bloom_jax.data import languages
from bloom_jax.data import vocabularies
from tests.data.helpers import write_jsonl


@pytest.fixture
def corpus(tmp_path):
    write_jsonl(tmp_path / "corpus" / "en.jsonl",
                [f"The river number {i} runs to the sea through the forest." for i in range(200)])
    write_jsonl(tmp_path / "corpus" / "sw.jsonl",
                [f"Mto namba {i} unapita msituni hadi baharini." for i in range(50)])
    return tmp_path / "corpus"


def test_trained_model_encodes_any_text(corpus, tmp_path):
    path = tokenizer.train(corpus, vocab_size=320, out=tmp_path / "tok.model")
    vocabulary = vocabularies.load_vocabulary(path)
    assert (vocabulary.vocab_size, vocabulary.eos_id, vocabulary.pad_id) == (320, 1, 0)
    for text in ["The river runs to the sea.", "Mto unapita", "日本語 🙂"]:  # last: bytes only
        ids = vocabulary.encode(text)
        assert vocabulary.decode(ids) == text
    assert len(vocabulary.encode("The river runs")) < len("The river runs") / 2  # merges learned


TEXTS = ["The river runs to the sea.", "Mto unapita  msituni,\nhadi baharini!", "日本語 🙂",
         "  leading spaces\tand tabs", "كيف حالك؟", "x = f(a, b)  # code"]


def test_alpha_weights_the_training_text(corpus):
    chars = lambda alpha: {name: sum(map(len, texts)) for name, texts in
                           tokenizer.training_sample(corpus, max_chars=2000, alpha=alpha)}
    proportional, uniform = chars(1.0), chars(0.0)
    assert proportional["roots_en"] > 3 * proportional["roots_sw"]
    assert abs(uniform["roots_en"] - uniform["roots_sw"]) < 120  # one document


def test_the_sample_is_random_across_the_corpus_and_bounded():
    """Documents are drawn from the whole stream, not its start, within the budget."""
    texts = (f"document {i:05d}" for i in range(10_000))  # 14 characters each
    sample = tokenizer._random_sample(texts, budget=1400, seed=(0,))
    assert 1400 - 14 < sum(map(len, sample)) <= 1400
    numbers = sorted(int(text.split()[1]) for text in sample)
    assert len(set(numbers)) == 100 and numbers[-1] > 9000 and 3000 < numbers[50] < 7000


def test_byte_level_bpe_is_blooms_kind_and_round_trips(corpus, tmp_path):
    path = tokenizer.train(corpus, vocab_size=400, out=tmp_path / "tok" / "tokenizer.json")
    loaded = tokenizers.Tokenizer.from_file(str(path))
    spec = json.loads(path.read_text())
    assert spec["normalizer"] is None and spec["model"]["type"] == "BPE"
    assert [t["content"] for t in spec["added_tokens"]] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [loaded.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    # BLOOM's pre-tokenization: a space sticks to the word after it, punctuation runs apart.
    pieces = [p for p, _ in loaded.pre_tokenizer.pre_tokenize_str("Hi, the river... 河。ok  two")]
    assert pieces == ["Hi", ",", "Ġthe", "Ġriver", "...", "Ġæ²³", "ãĢĤ", "ok", "Ġ", "Ġtwo"]
    for text in TEXTS:  # byte-level: any text, unseen scripts included
        assert loaded.decode(loaded.encode(text).ids) == text
    assert len(loaded.encode("The river runs").ids) < len("The river runs") / 2  # merges learned
    vocabulary = vocabularies.load_vocabulary(path)  # as the trainer's VOCABULARY
    assert (vocabulary.vocab_size, vocabulary.eos_id, vocabulary.pad_id) == (400, 2, 3)
    assert vocabulary.decode(vocabulary.encode(TEXTS[1])) == TEXTS[1]
    assert languages.padded_vocab_size(vocabulary.vocab_size) == 512
    vocabularies.check_fits_model(vocabulary, 512)
    with pytest.raises(ValueError, match="BloomConfig.vocab_size = 512"):
        vocabularies.check_fits_model(vocabulary, 400)


def test_out_must_be_a_tokenizer_json_or_a_model_file(corpus, tmp_path):
    with pytest.raises(ValueError, match="end it in '.json' .* or in '.model'"):
        tokenizer.train(corpus, vocab_size=320, out=tmp_path / "tok.bin")
    with pytest.raises(ValueError, match="give at least 260"):
        tokenizer.train(corpus, vocab_size=200, out=tmp_path / "tokenizer.json")


@pytest.mark.slow
def test_command_line(corpus, tmp_path):
    out = tmp_path / "cli" / "tokenizer.json"
    result = subprocess.run(
        [sys.executable, "-m", "bloom_jax.data.tokenizer", "train", f"--data_dir={corpus}",
         "--vocab_size=300", f"--out={out}"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Wrote {out}" in result.stdout
    assert vocabularies.load_vocabulary(out).vocab_size == 300
    assert "--gin.BloomConfig.vocab_size=384" in result.stdout
