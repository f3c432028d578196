"""Vocabularies as seqio.Vocabulary: our SentencePiece byte-fallback BPE and BLOOM's tokenizer.json.

Both encode text without adding special tokens; the tasks append EOS to every document. The
model's embedding is larger than the vocabulary: `languages.padded_vocab_size` rounds it up to a
multiple of 128, as BLOOM pads 250,680 to 250,880.
"""

from __future__ import annotations

import pathlib

import gin
import numpy as np
import seqio
import tensorflow as tf

from bloom_jax.data import documents
from bloom_jax.data import languages

try:  # seqio brings TensorFlow; it is kept off the accelerators (JAX owns them)
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already set up its devices in this process; leave them be
    pass

DEFAULT_SENTENCEPIECE_MODEL = documents.DEFAULT_CORPUS_DIR / "sentencepiece.model"


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """A Hugging Face `tokenizer.json` (e.g. BLOOM's byte-level BPE) as a seqio Vocabulary.

    Special ids come from the file's `</s>`, `<unk>` and `<pad>` tokens (BLOOM: 2, 0, 3).
    """

    def __init__(self, path: str | pathlib.Path, eos_token: str = "</s>",
                 unk_token: str = "<unk>", pad_token: str = "<pad>"):
        import tokenizers  # pylint: disable=g-import-not-at-top  # only needed for this vocabulary

        self.path = pathlib.Path(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        self._eos_id = self._require_token(eos_token)
        self._unk_id = self._tokenizer.token_to_id(unk_token)
        self._pad_id = self._tokenizer.token_to_id(pad_token)
        super().__init__(extra_ids=0)

    def _require_token(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Tokenizer {self.path} has no {token!r} token; it is needed as the "
                             "end-of-document id. Pass eos_token= with the file's EOS token.")
        return token_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        return 0 if self._pad_id is None else self._pad_id

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        encode = lambda b: np.asarray(self._encode(np.asarray(b).item().decode("utf-8")), np.int32)
        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        decode = lambda i: np.asarray(self._decode(i.tolist()).encode("utf-8"), object)
        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        text.set_shape([])
        return text

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizerJsonVocabulary) and self.path == other.path

    def __str__(self) -> str:
        return f"TokenizerJsonVocabulary(path={self.path}, size={self.vocab_size})"


@gin.configurable
def load_vocabulary(path: str | pathlib.Path | None = None) -> seqio.Vocabulary:
    """A vocabulary from a SentencePiece `.model` or a Hugging Face `tokenizer.json`.

    None gives the SentencePiece model shipped with the default corpus. Gin:
    `load_vocabulary.path = "/path/to/tokenizer.json"`.
    """
    path = pathlib.Path(path or DEFAULT_SENTENCEPIECE_MODEL)
    if not path.is_file():
        raise FileNotFoundError(f"Vocabulary file {path} does not exist. Train one with "
                                "`python -m bloom_jax.data.tokenizer train` or give BLOOM's "
                                "tokenizer.json.")
    kinds = {".json": ("Hugging Face tokenizer.json", TokenizerJsonVocabulary),
             ".model": ("SentencePiece model", _sentencepiece_vocabulary)}
    if path.suffix in kinds:
        kind, load = kinds[path.suffix]
        try:
            return load(path)
        except Exception as error:  # protobuf, sentencepiece and tokenizers raise their own kinds
            raise ValueError(f"Vocabulary file {path} is not a readable {kind} "
                             f"({type(error).__name__}: {error}); give a valid one.") from error
    raise ValueError(f"Vocabulary file {path}: expected a SentencePiece '.model' or a Hugging "
                     "Face 'tokenizer.json'.")


def _sentencepiece_vocabulary(path: pathlib.Path) -> seqio.SentencePieceVocabulary:
    """seqio's vocabulary of a SentencePiece model, its file read now (seqio reads it lazily,
    at the first encode)."""
    vocabulary = seqio.SentencePieceVocabulary(str(path))
    vocabulary.tokenizer  # pylint: disable=pointless-statement  # loads and parses the model
    return vocabulary


def vocabulary_file(vocabulary: seqio.Vocabulary) -> str:
    """The file a vocabulary was loaded from, for error messages."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return vocabulary.sentencepiece_model_file
    return str(getattr(vocabulary, "path", vocabulary))


def check_fits_model(vocabulary: seqio.Vocabulary, model_vocab_size: int,
                     multiple: int = 128) -> None:
    """Raises unless the model's vocab_size is at least the vocabulary's padded size."""
    needed = languages.padded_vocab_size(vocabulary.vocab_size, multiple)
    if model_vocab_size < needed:
        raise ValueError(
            f"Vocabulary {vocabulary_file(vocabulary)} has {vocabulary.vocab_size} ids but the "
            f"model's vocab_size is {model_vocab_size}; set BloomConfig.vocab_size = {needed} "
            f"(the vocabulary padded to a multiple of {multiple}).")
