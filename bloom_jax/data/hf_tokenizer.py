"""A vocabulary as Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`).

`convert to_hf` writes them next to the weights so that `AutoTokenizer` loads the export. BLOOM's
`tokenizer.json` is copied as it is; a SentencePiece BPE model (the embedded one, or one trained
with `bloom_jax.data.tokenizer`) is rebuilt in the `tokenizers` library with its own normalizer
settings, so the file encodes every text to SentencePiece's ids.
"""

from __future__ import annotations

import json
import pathlib

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, normalizers, pre_tokenizers

from bloom_jax.data import vocabulary_files

_NORMAL = 1  # SentencePiece's type of a piece that merges
_BPE = 2  # SentencePiece model type


def _sentencepiece_tokenizer(model_file: str) -> tokenizers.Tokenizer:
    """A byte-fallback SentencePiece BPE model as a `tokenizers.Tokenizer` with the same ids."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(pathlib.Path(model_file).read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _BPE or normalizer.name != "identity":
        raise ValueError(f"{model_file} is not a SentencePiece BPE model without normalization "
                         "rules; export it with the tokenizer.json it came with (--vocabulary).")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    # SentencePiece merges the adjacent pair whose merged piece scores highest.
    merges = sorted(((normal[piece], piece[:k], piece[k:]) for piece in normal
                     for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=[(left, right) for _, left, right in merges],
        unk_token=proto.pieces[trainer.unk_id].piece, fuse_unk=True,
        byte_fallback=trainer.byte_fallback))
    rules = []
    if normalizer.remove_extra_whitespaces:
        rules += [normalizers.Replace(tokenizers.Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(tokenizers.Regex(" {2,}"), " ")]
    rules.append(normalizers.Replace(" ", "▁"))
    scheme = "never"
    if normalizer.add_dummy_prefix:  # Metaspace adds no prefix to a text that starts with "▁"
        rules.append(normalizers.Replace(tokenizers.Regex(r"\A▁"), "▁▁"))
        scheme = "first"
    tokenizer.normalizer = normalizers.Sequence(rules)
    splits = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)]
    if trainer.split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def tokenizer_json(vocabulary: vocabulary_files.VocabularyFile) -> str:
    """The `tokenizer.json` text that encodes as `vocabulary` does."""
    if isinstance(vocabulary, vocabulary_files.TokenizerJsonFile):
        return vocabulary.path.read_text()
    return _sentencepiece_tokenizer(str(vocabulary.path)).to_str()


def write_tokenizer_files(vocabulary: vocabulary_files.VocabularyFile,
                          directory: str | pathlib.Path) -> dict[str, int | None]:
    """Writes `tokenizer.json` and a `tokenizer_config.json` naming its special tokens; returns
    their ids as `config.json` names them (`bos_token_id`: "<s>", None when there is none)."""
    directory = pathlib.Path(directory)
    text = tokenizer_json(vocabulary)
    (directory / "tokenizer.json").write_text(text)
    loaded = tokenizers.Tokenizer.from_str(text)
    ids = {"bos_token_id": loaded.token_to_id("<s>"), "eos_token_id": vocabulary.eos_id,
           "pad_token_id": vocabulary.pad_id, "unk_token_id": vocabulary.unk_id}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
              "clean_up_tokenization_spaces": False,
              **{name.removesuffix("_id"): loaded.id_to_token(i)
                 for name, i in ids.items() if i is not None}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids
