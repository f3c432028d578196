"""Vocabularies as seqio.Vocabulary: our SentencePiece byte-fallback BPE and BLOOM's tokenizer.json.

Both encode text without adding special tokens; the tasks append EOS to every document. The
model's embedding is larger than the vocabulary: `languages.padded_vocab_size` rounds it up to a
multiple of 128, as BLOOM pads 250,680 to 250,880. The files themselves are opened by
`vocabulary_files.py`, which tools that need no data pipeline use without TensorFlow.
"""

from __future__ import annotations

import pathlib

import gin
import numpy as np
import seqio
import tensorflow as tf

from bloom_jax.data import vocabulary_files

try:  # seqio brings TensorFlow; it is kept off the accelerators (JAX owns them)
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already set up its devices in this process; leave them be
    pass


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """A Hugging Face `tokenizer.json` (`vocabulary_files.TokenizerJsonFile`) as a seqio
    Vocabulary."""

    def __init__(self, file: vocabulary_files.TokenizerJsonFile):
        self.file = file
        super().__init__(extra_ids=0)

    @property
    def path(self) -> pathlib.Path:
        return self.file.path

    @property
    def eos_id(self) -> int:
        return self.file.eos_id

    @property
    def unk_id(self) -> int | None:
        return self.file.unk_id

    @property
    def pad_id(self) -> int:
        return self.file.pad_id

    @property
    def _base_vocab_size(self) -> int:
        return self.file.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.file.encode(s)

    def _decode(self, ids) -> str:
        return self.file.detokenize(ids)

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
    """A vocabulary from a SentencePiece `.model` or a Hugging Face `tokenizer.json`
    (`vocabulary_files.open_vocabulary`: None gives the default corpus's SentencePiece model).
    Gin: `load_vocabulary.path = "/path/to/tokenizer.json"`.
    """
    file = vocabulary_files.open_vocabulary(path)
    if isinstance(file, vocabulary_files.TokenizerJsonFile):
        return TokenizerJsonVocabulary(file)
    return seqio.SentencePieceVocabulary(str(file.path))


def vocabulary_file(vocabulary: seqio.Vocabulary) -> str:
    """The file a vocabulary was loaded from, for error messages."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return vocabulary.sentencepiece_model_file
    return str(getattr(vocabulary, "path", vocabulary))


def check_fits_model(vocabulary: seqio.Vocabulary, model_vocab_size: int) -> None:
    """Raises unless the model's vocab_size is at least the vocabulary's padded size."""
    vocabulary_files.check_fits_model(vocabulary.vocab_size, vocabulary_file(vocabulary),
                                      model_vocab_size)
