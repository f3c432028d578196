"""The ROOTS table: BLOOM's 46 natural and 13 programming languages and their training shares.

This is the one place that names the languages. Each entry gives the folder a corpus keeps the
language in (`<data_dir>/<directory>/` or `<data_dir>/<directory>.jsonl`, following the layout of
the ROOTS sample: `en`, `zh`, `zh-Hant`, ..., `code/python`) and its share of BLOOM's training
mix in percent.

Shares: natural languages use the sampling ratios of the file every tr11 run read,
bigscience-workshop/bigscience `data/catalogue/training_dataset_ratios_merged_nigercongo_v3.json`.
Two shares are derived, because the ratio file merges them into one dataset each:
  * the 22 Niger-Congo languages share 0.0316 %, split in proportion to their bytes in ROOTS
    (the BLOOM paper's language table, arXiv:2211.05100, Table 1);
  * the 13 programming languages share 13.03 %, split in proportion to their file counts on the
    BLOOM model card (the per-language byte counts were not published).
`mixture_rates` turns the shares (or token counts, or given rates) into the mixture's rates.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Mapping

import gin

_NIGER_CONGO_SHARE = 0.0316  # percent, one merged dataset in the ratio file
_CODE_SHARE = 13.03  # percent, one merged dataset in the ratio file


@dataclasses.dataclass(frozen=True)
class Language:
    """One ROOTS language: where a corpus keeps it and its share of BLOOM's mix (percent)."""

    directory: str  # folder name under data_dir, e.g. "zh-Hant" or "code/python"
    name: str  # English name
    share: float  # percent of BLOOM's training samples
    extensions: tuple[str, ...] = ()  # source-file suffixes read as documents (code only)

    @property
    def is_code(self) -> bool:
        return self.directory.startswith("code/")

    @property
    def task_name(self) -> str:
        """The seqio task name: `roots_` + the directory with `/` and `-` as `_`
        (`roots_zh_hant`)."""
        return "roots_" + re.sub(r"[/-]", "_", self.directory).lower()


# (directory, name, sampling percent) from the v3 ratio file.
_NATURAL = (
    ("en", "English", 30.31),
    ("zh", "Simplified Chinese", 17.62),
    ("zh-Hant", "Traditional Chinese", 0.052),
    ("fr", "French", 13.05),
    ("es", "Spanish", 10.67),
    ("pt", "Portuguese", 4.95),
    ("ar", "Arabic", 3.31),
    ("vi", "Vietnamese", 2.46),
    ("hi", "Hindi", 0.747),
    ("id", "Indonesian", 1.09),
    ("bn", "Bengali", 0.549),
    ("ca", "Catalan", 1.12),
    ("ta", "Tamil", 0.211),
    ("ml", "Malayalam", 0.103),
    ("te", "Telugu", 0.091),
    ("ur", "Urdu", 0.125),
    ("ne", "Nepali", 0.067),
    ("eu", "Basque", 0.156),
    ("kn", "Kannada", 0.062),
    ("mr", "Marathi", 0.050),
    ("pa", "Punjabi", 0.051),
    ("gu", "Gujarati", 0.040),
    ("or", "Odia", 0.036),
    ("as", "Assamese", 0.011),
)

# (directory, name, megabytes in ROOTS): the merged Niger-Congo dataset.
_NIGER_CONGO = (
    ("sw", "Swahili", 236.5),
    ("yo", "Yoruba", 89.70),
    ("rw", "Kinyarwanda", 40.43),
    ("xh", "Xhosa", 14.30),
    ("ig", "Igbo", 14.08),
    ("zu", "Zulu", 8.51),
    ("sn", "Shona", 6.64),
    ("lg", "Luganda", 4.57),
    ("wo", "Wolof", 3.61),
    ("rn", "Kirundi", 3.27),
    ("fon", "Fon", 2.48),
    ("nso", "Northern Sotho", 1.76),
    ("ln", "Lingala", 1.65),
    ("tn", "Setswana", 1.50),
    ("tw", "Twi", 1.27),
    ("ny", "Chichewa", 1.19),
    ("st", "Sesotho", 0.751),
    ("ts", "Xitsonga", 0.708),
    ("ak", "Akan", 0.702),
    ("bm", "Bambara", 0.392),
    ("ki", "Kikuyu", 0.360),
    ("tum", "Chitumbuka", 0.170),
)

# (directory, name, files on the model card, source-file suffixes): the merged code dataset.
_CODE = (
    ("code/java", "Java", 5_407_724, (".java",)),
    ("code/php", "PHP", 4_952_893, (".php",)),
    ("code/cpp", "C++", 3_463_225, (".cpp", ".cc", ".hpp", ".hh", ".H", ".c++", ".h++")),
    ("code/python", "Python", 2_435_072, (".py",)),
    ("code/javascript", "JavaScript", 1_905_518, (".js",)),
    ("code/csharp", "C#", 1_577_347, (".cs",)),
    ("code/ruby", "Ruby", 678_413, (".rb",)),
    ("code/lua", "Lua", 352_317, (".lua",)),
    ("code/go", "Go", 227_763, (".go",)),
    ("code/typescript", "TypeScript", 228_361, (".ts", ".tsx")),
    ("code/c", "C", 134_537, (".c", ".h")),
    ("code/scala", "Scala", 92_052, (".scala",)),
    ("code/rust", "Rust", 29_693, (".rs",)),
)


def _split(total: float, weights: Mapping[str, float]) -> dict[str, float]:
    norm = sum(weights.values())
    return {key: total * weight / norm for key, weight in weights.items()}


def _build_table() -> tuple[Language, ...]:
    niger_congo = _split(_NIGER_CONGO_SHARE, {d: mb for d, _, mb in _NIGER_CONGO})
    code = _split(_CODE_SHARE, {d: files for d, _, files, _ in _CODE})
    return (
        tuple(Language(d, name, share) for d, name, share in _NATURAL)
        + tuple(Language(d, name, niger_congo[d]) for d, name, _ in _NIGER_CONGO)
        + tuple(Language(d, name, code[d], ext) for d, name, _, ext in _CODE)
    )


LANGUAGES: tuple[Language, ...] = _build_table()
BY_DIRECTORY: Mapping[str, Language] = {lang.directory: lang for lang in LANGUAGES}
BY_TASK_NAME: Mapping[str, Language] = {lang.task_name: lang for lang in LANGUAGES}


def lookup(key: str) -> Language:
    """The language named by its directory (`zh-Hant`, `code/python`) or task name (`roots_en`)."""
    language = BY_DIRECTORY.get(key) or BY_TASK_NAME.get(key)
    if language is None:
        raise ValueError(
            f"Unknown ROOTS language {key!r}. Use a directory name from "
            f"bloom_jax/data/languages.py, e.g. 'en', 'zh-Hant', 'code/python', or a task name "
            f"such as 'roots_en'. Known: {', '.join(BY_DIRECTORY)}.")
    return language


@gin.configurable
def mixture_rates(sizes: Mapping[str, float], rates: Mapping[str, float] | None = None,
                  alpha: float | None = None) -> dict[str, float]:
    """Normalized sampling rates for the tasks in `sizes` (task name -> tokens or bytes).

    Default: BLOOM's shares. `rates`: explicit weights keyed by directory or task name (tasks
    without one are left out). `alpha`: weight = size ** alpha (1 = proportional, < 1 up-samples
    small languages). Gin: `mixture_rates.alpha = 0.3` or `mixture_rates.rates = {"en": 2, ...}`.
    """
    if rates is not None and alpha is not None:
        raise ValueError("Give mixture_rates either `rates` or `alpha`, not both.")
    if rates is not None:
        by_task = {lookup(key).task_name: float(rate) for key, rate in rates.items()}
        missing = sorted(set(by_task) - set(sizes))
        if missing:
            logging.warning("Rates given for tasks with no data, dropped: %s", ", ".join(missing))
        weights = {name: by_task.get(name, 0.0) for name in sizes}
    elif alpha is not None:
        weights = {name: float(size) ** alpha if size > 0 else 0.0 for name, size in sizes.items()}
    else:
        weights = {name: BY_TASK_NAME[name].share for name in sizes}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"Mixture rates must be non-negative with a positive sum; got {weights}.")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items() if w > 0}


def padded_vocab_size(size: int, multiple: int = 128) -> int:
    """`size` rounded up to a multiple of `multiple`: the model's embedding for a vocabulary
    (BLOOM chose 250,880 = 490 x 512 for 250,680)."""
    return -(-size // multiple) * multiple
