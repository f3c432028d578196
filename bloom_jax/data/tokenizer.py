"""Trains a SentencePiece byte-fallback BPE vocabulary on a ROOTS-style corpus.

  python -m bloom_jax.data.tokenizer train --data_dir=DIR --vocab_size=N --out=FILE.model

Each language contributes characters in proportion to its mixture rate over its byte count
(`mixture_rates`; `--alpha` overrides, as BLOOM's tokenizer used alpha-weighting), up to
`--max_chars` in total. Ids follow seqio's convention: 0 = pad, 1 = EOS, 2 = unknown; unknown
characters fall back to their UTF-8 bytes, so every text is encodable.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import sentencepiece as spm

from bloom_jax import configs
from bloom_jax.data import documents
from bloom_jax.data import languages

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    configs.define_data_dir_flag()
    flags.DEFINE_integer("vocab_size", 2000, "Number of pieces, including 256 bytes.")
    flags.DEFINE_string("out", None, "Output SentencePiece model file, ending in .model.")
    flags.DEFINE_float("alpha", None, "Weight languages by bytes ** alpha (default: the "
                                      "mixture's rates, BLOOM's shares unless gin says otherwise).")
    flags.DEFINE_integer("max_chars", 50_000_000, "Characters of training text.")

_TRAIN_SPLIT = "train"


def training_text(data_dir: pathlib.Path, max_chars: int, alpha: float | None,
                  validation_fraction: float = 0.05) -> dict[str, list[str]]:
    """Per task, the train documents taken in file order up to its share of `max_chars`."""
    present = [lang for lang in languages.LANGUAGES
               if documents.language_files(data_dir, lang, _TRAIN_SPLIT)]
    if not present:
        raise FileNotFoundError(f"No ROOTS language found in {data_dir}.")
    texts = {lang.task_name: list(documents.language_documents(
        data_dir, lang, _TRAIN_SPLIT, validation_fraction)) for lang in present}
    sizes = {name: sum(len(t.encode("utf-8")) for t in docs) for name, docs in texts.items()}
    rates = (languages.mixture_rates(sizes, alpha=alpha) if alpha is not None
             else languages.mixture_rates(sizes))
    chosen = {}
    for name, rate in rates.items():
        budget, chosen[name] = rate * max_chars, []
        for text in texts[name]:
            if budget <= 0:
                break
            chosen[name].append(text)
            budget -= len(text)
    return chosen


def train(data_dir: str | pathlib.Path | None, vocab_size: int, out: str | pathlib.Path,
          alpha: float | None = None, max_chars: int = 50_000_000) -> pathlib.Path:
    """Trains the vocabulary and writes `out` (a `.model` file); returns its path."""
    out = pathlib.Path(out)
    if out.suffix != ".model":
        raise ValueError(f"--out {out}: a SentencePiece model file must end in '.model'.")
    data_dir = documents.resolve_data_dir(data_dir)
    chosen = training_text(data_dir, max_chars, alpha)
    for name, docs in chosen.items():
        logging.info("%s: %d documents, %d characters.", name, len(docs), sum(map(len, docs)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as lines:
        for docs in chosen.values():
            for text in docs:
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
    return out


def main(argv: Sequence[str]) -> None:
    if argv[1:] != ["train"]:
        raise app.UsageError("Usage: python -m bloom_jax.data.tokenizer train --data_dir DIR "
                             "--vocab_size N --out FILE.model")
    if not FLAGS.out:
        raise app.UsageError("--out is required (e.g. --out /tmp/roots.model).")
    # The corpus and mixture settings of a training config; the rest of it is not loaded here.
    configs.parse_flags(skip_unknown=True, default_file=configs.BASE_CONFIG)
    path = train(configs.macro("DATA_DIR"), FLAGS.vocab_size, FLAGS.out, FLAGS.alpha,
                 FLAGS.max_chars)
    print(f"Wrote {path} ({FLAGS.vocab_size} pieces).")


if __name__ == "__main__":
    define_flags()
    configs.run(main)
