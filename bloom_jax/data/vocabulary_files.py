"""Vocabulary files opened by their own libraries, without seqio or TensorFlow.

A SentencePiece `.model` (sentencepiece) or a Hugging Face `tokenizer.json` (tokenizers): what
generate, serve, the Hugging Face export and the token store's builder need (encode, decode, the
special ids, the file), in processes that never import TensorFlow (which seqio brings: ~5 s and
~0.8 GB of host memory). `vocabularies.py` gives the same files to the data pipeline as seqio
Vocabularies.
"""

from __future__ import annotations

import abc
import pathlib
from collections.abc import Sequence

from bloom_jax.data import documents
from bloom_jax.data import languages

DEFAULT_SENTENCEPIECE_MODEL = documents.DEFAULT_CORPUS_DIR / "sentencepiece.model"


class VocabularyFile(abc.ABC):
    """One vocabulary file: text to ids without special tokens, and ids back to text."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Ids in the file (the model's embedding pads it: `check_fits_model`)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        ...

    @property
    @abc.abstractmethod
    def unk_id(self) -> int | None:
        ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        ...

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        """Each text's ids, without special tokens, on up to `threads` threads."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of every id in `ids`, which all lie in the vocabulary."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` up to and including the first EOS, ids past the vocabulary read as
        unknown: seqio's `Vocabulary.decode`, so both kinds of vocabulary decode alike."""
        ids = [int(i) for i in ids]
        if self.unk_id is not None:
            ids = [self.unk_id if i >= self.vocab_size else i for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id) + 1]
        return self.detokenize(ids)

    def __str__(self) -> str:
        return f"{type(self).__name__}(path={self.path}, size={self.vocab_size})"


class SentencePieceFile(VocabularyFile):
    """A SentencePiece model (ours: byte-fallback BPE, `bloom_jax.data.tokenizer`)."""

    def __init__(self, path: str | pathlib.Path):
        import sentencepiece  # pylint: disable=g-import-not-at-top  # only for this kind

        super().__init__(path)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def unk_id(self) -> int | None:
        return self.processor.unk_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.processor.decode(list(ids))


class TokenizerJsonFile(VocabularyFile):
    """A Hugging Face `tokenizer.json` (e.g. BLOOM's byte-level BPE). Special ids come from
    its `</s>`, `<unk>` and `<pad>` tokens (BLOOM: 2, 0, 3)."""

    def __init__(self, path: str | pathlib.Path, eos_token: str = "</s>",
                 unk_token: str = "<unk>", pad_token: str = "<pad>"):
        import tokenizers  # pylint: disable=g-import-not-at-top  # only for this kind

        super().__init__(path)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        self._eos_id = self.tokenizer.token_to_id(eos_token)
        if self._eos_id is None:
            raise ValueError(f"Tokenizer {self.path} has no {eos_token!r} token; it is needed as "
                             "the end-of-document id. Pass eos_token= with the file's EOS token.")
        self._unk_id = self.tokenizer.token_to_id(unk_token)
        self._pad_id = self.tokenizer.token_to_id(pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        return 0 if self._pad_id is None else self._pad_id

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        """tokenizers' `encode_batch` runs on its own threads (TOKENIZERS_PARALLELISM=false:
        one), whatever `threads` says."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


_KINDS = {".json": ("Hugging Face tokenizer.json", TokenizerJsonFile),
          ".model": ("SentencePiece model", SentencePieceFile)}


def open_vocabulary(path: str | pathlib.Path | None = None) -> VocabularyFile:
    """The vocabulary in a SentencePiece `.model` or a Hugging Face `tokenizer.json`; None gives
    the SentencePiece model shipped with the default corpus."""
    path = pathlib.Path(path or DEFAULT_SENTENCEPIECE_MODEL)
    if not path.is_file():
        raise FileNotFoundError(f"Vocabulary file {path} does not exist. Train one with "
                                "`python -m bloom_jax.data.tokenizer train` or give BLOOM's "
                                "tokenizer.json.")
    if path.suffix not in _KINDS:
        raise ValueError(f"Vocabulary file {path}: expected a SentencePiece '.model' or a "
                         "Hugging Face 'tokenizer.json'.")
    kind, load = _KINDS[path.suffix]
    try:
        return load(path)
    except Exception as error:  # protobuf, sentencepiece and tokenizers raise their own kinds
        raise ValueError(f"Vocabulary file {path} is not a readable {kind} "
                         f"({type(error).__name__}: {error}); give a valid one.") from error


def check_fits_model(vocab_size: int, vocabulary_file: str | pathlib.Path,
                     model_vocab_size: int, multiple: int = 128) -> None:
    """Raises unless the model's vocab_size is at least the vocabulary's padded size."""
    needed = languages.padded_vocab_size(vocab_size, multiple)
    if model_vocab_size < needed:
        raise ValueError(
            f"Vocabulary {vocabulary_file} has {vocab_size} ids but the model's vocab_size is "
            f"{model_vocab_size}; set BloomConfig.vocab_size = {needed} (the vocabulary padded "
            f"to a multiple of {multiple}).")
