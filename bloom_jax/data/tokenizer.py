"""Trains a vocabulary on a ROOTS-style corpus: BLOOM's byte-level BPE, or a SentencePiece BPE.

  python -m bloom_jax.data.tokenizer train --data_dir=DIR --vocab_size=N --out=DIR/tokenizer.json
  python -m bloom_jax.data.tokenizer train --data_dir=DIR --vocab_size=N --out=FILE.model

`--out` ending in `.json` writes a Hugging Face `tokenizer.json` built as BLOOM's was, with the
`tokenizers` library: byte-level BPE, no normalizer, BLOOM's Split regex then ByteLevel as
pre-tokenizer, special tokens `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3 (BLOOM's ids); every text
is encodable. `--out` ending in `.model` writes a SentencePiece byte-fallback BPE with seqio's
ids (0 = pad, 1 = EOS, 2 = unknown). Either file is a VOCABULARY for the trainer; the model's
vocab_size is the vocabulary padded to a multiple of 128, which the command prints.

The training text is a sample drawn in the mixture's proportions: each language gets
`--max_chars` x its rate (`mixture_rates`, BLOOM's shares unless gin says otherwise; `--alpha`
weights languages by their file bytes ** alpha, as BLOOM's tokenizer used alpha-weighting), filled
with a uniformly random sample of its documents. The corpus is streamed: memory holds the sample
of one language at a time, never a language's whole text.
"""

from __future__ import annotations

import heapq
import pathlib
import tempfile
import zlib
from typing import Iterable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from bloom_jax import configs
from bloom_jax.data import documents
from bloom_jax.data import languages

FLAGS = flags.FLAGS

# BLOOM's tokenizer.json (bigscience/bloom): an optional space and a run of characters that are
# neither whitespace nor . , ! ? … 。 ， 、 । ۔ ، is one piece; so is each run between such pieces.
BLOOM_SPLIT_REGEX = r" ?[^(\s|[.,!?…。，、।۔،])]+"
BLOOM_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_TRAIN_SPLIT = "train"


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    configs.define_data_dir_flag()
    flags.DEFINE_integer("vocab_size", 2000, "Number of tokens, including the 256 bytes and the "
                                             "special tokens.")
    flags.DEFINE_string("out", None, "Output file: a tokenizer.json (any name ending in .json: "
                                     "byte-level BPE) or a SentencePiece .model.")
    flags.DEFINE_float("alpha", None, "Weight languages by bytes ** alpha (default: the "
                                      "mixture's rates, BLOOM's shares unless gin says otherwise).")
    flags.DEFINE_integer("max_chars", 50_000_000, "Characters of training text.")


def _random_sample(texts: Iterable[str], budget: float, seed: tuple[int, ...]) -> list[str]:
    """A uniformly random sample of `texts` holding at most `budget` characters: the texts of
    lowest random keys that fit (a bottom-k reservoir, so memory never exceeds the budget)."""
    rng = np.random.default_rng(seed)
    kept, chars = [], 0  # heap of (-key, index, text): the highest key on top
    for index, text in enumerate(texts):
        key = rng.random()
        if chars + len(text) > budget and not (kept and key < -kept[0][0]):
            continue
        heapq.heappush(kept, (-key, index, text))
        chars += len(text)
        while chars > budget:
            chars -= len(heapq.heappop(kept)[2])
    return [text for _, _, text in sorted(kept, reverse=True)]  # in key order


def training_sample(data_dir: pathlib.Path, max_chars: int, alpha: float | None,
                    validation_fraction: float = 0.05) -> Iterator[tuple[str, list[str]]]:
    """Per task (one at a time), a random sample of its train documents filling its share of
    `max_chars`. Languages are weighted by the mixture's rates over their files' bytes."""
    present = [lang for lang in languages.LANGUAGES
               if documents.language_files(data_dir, lang, _TRAIN_SPLIT)]
    if not present:
        raise FileNotFoundError(f"No ROOTS language found in {data_dir}.")
    sizes = {lang.task_name: sum(f.stat().st_size for f in documents.language_files(
        data_dir, lang, _TRAIN_SPLIT)) for lang in present}
    rates = (languages.mixture_rates(sizes, alpha=alpha) if alpha is not None
             else languages.mixture_rates(sizes))
    for lang in present:
        if lang.task_name in rates:
            texts = documents.language_documents(data_dir, lang, _TRAIN_SPLIT,
                                                 validation_fraction)
            yield lang.task_name, _random_sample(texts, rates[lang.task_name] * max_chars,
                                                 seed=(zlib.crc32(lang.task_name.encode()),))


def bloom_tokenizer() -> tokenizers.Tokenizer:
    """An untrained tokenizer with BLOOM's byte-level BPE pipeline and no normalizer."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(BLOOM_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _logged(sample: Iterator[tuple[str, list[str]]]) -> Iterator[str]:
    """The documents of a training sample, logging each language's part."""
    for name, texts in sample:
        logging.info("%s: %d documents, %d characters.", name, len(texts), sum(map(len, texts)))
        yield from texts


def _train_byte_level_bpe(texts: Iterator[str], vocab_size: int, out: pathlib.Path) -> None:
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(BLOOM_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"--vocab_size {vocab_size} is below the {minimum} tokens of the bytes "
                         f"and special tokens; give at least {minimum}.")
    tokenizer = bloom_tokenizer()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BLOOM_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(out))


def _train_sentencepiece(texts: Iterator[str], vocab_size: int, out: pathlib.Path) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as lines:
        for text in texts:
            lines.writelines(line + "\n" for line in text.splitlines() if line.strip())
        lines.flush()
        spm.SentencePieceTrainer.train(
            input=lines.name, model_prefix=str(out.with_suffix("")), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=1 << 16, shuffle_input_sentence=True, num_threads=2,
            minloglevel=2)
    out.with_suffix(".vocab").unlink(missing_ok=True)


def train(data_dir: str | pathlib.Path | None, vocab_size: int, out: str | pathlib.Path,
          alpha: float | None = None, max_chars: int = 50_000_000) -> pathlib.Path:
    """Trains the vocabulary and writes `out` (`.json`: byte-level BPE, `.model`: SentencePiece);
    returns its path."""
    out = pathlib.Path(out)
    trainer = {".json": _train_byte_level_bpe, ".model": _train_sentencepiece}.get(out.suffix)
    if trainer is None:
        raise ValueError(f"--out {out}: end it in '.json' for a byte-level BPE tokenizer.json "
                         "(BLOOM's kind) or in '.model' for a SentencePiece model.")
    data_dir = documents.resolve_data_dir(data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer(_logged(training_sample(data_dir, max_chars, alpha)), vocab_size, out)
    return out


def vocabulary_size(path: pathlib.Path) -> int:
    """The ids of a trained `tokenizer.json` or SentencePiece model."""
    if path.suffix == ".json":
        return tokenizers.Tokenizer.from_file(str(path)).get_vocab_size()
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def main(argv: Sequence[str]) -> None:
    if argv[1:] != ["train"]:
        raise app.UsageError("Usage: python -m bloom_jax.data.tokenizer train --data_dir DIR "
                             "--vocab_size N --out DIR/tokenizer.json|FILE.model")
    if not FLAGS.out:
        raise app.UsageError("--out is required (e.g. --out /tmp/roots/tokenizer.json).")
    # The corpus and mixture settings of a training config; the rest of it is not loaded here.
    configs.parse_flags(skip_unknown=True, default_file=configs.BASE_CONFIG)
    path = train(configs.macro("DATA_DIR"), FLAGS.vocab_size, FLAGS.out, FLAGS.alpha,
                 FLAGS.max_chars)
    size = vocabulary_size(path)
    print(f"Wrote {path} ({size} tokens). Train with --gin.VOCABULARY={path} "
          f"--gin.BloomConfig.vocab_size={languages.padded_vocab_size(size)} (padded to a "
          "multiple of 128).")


if __name__ == "__main__":
    define_flags()
    configs.run(main)
