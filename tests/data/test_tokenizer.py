"""Training a SentencePiece byte-fallback BPE on a corpus, weighted by the mixture."""

import subprocess
import sys

import pytest

from bloom_jax.data import tokenizer
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


def test_alpha_weights_the_training_text(corpus):
    proportional = tokenizer.training_text(corpus, max_chars=2000, alpha=1.0)
    uniform = tokenizer.training_text(corpus, max_chars=2000, alpha=0.0)
    chars = lambda chosen, name: sum(map(len, chosen[name]))
    assert chars(proportional, "roots_en") > 3 * chars(proportional, "roots_sw")
    assert abs(chars(uniform, "roots_en") - chars(uniform, "roots_sw")) < 120  # one document


def test_out_must_be_a_model_file(corpus, tmp_path):
    with pytest.raises(ValueError, match="must end in '.model'"):
        tokenizer.train(corpus, vocab_size=320, out=tmp_path / "tok.bin")


@pytest.mark.slow
def test_command_line(corpus, tmp_path):
    out = tmp_path / "cli.model"
    result = subprocess.run(
        [sys.executable, "-m", "bloom_jax.data.tokenizer", "train", f"--data_dir={corpus}",
         "--vocab_size=300", f"--out={out}"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Wrote {out}" in result.stdout
    assert vocabularies.load_vocabulary(out).vocab_size == 300
