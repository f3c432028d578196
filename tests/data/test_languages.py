"""The ROOTS table: 46 + 13 languages, shares from BLOOM's v3 ratio file, unique names; the
mixture rates drawn from it."""

import logging
import re

import pytest

from bloom_jax.data import languages
from tests.data.helpers import SHARED_ROOTS_SAMPLE


def test_table_has_46_natural_and_13_code_languages():
    natural = [lang for lang in languages.LANGUAGES if not lang.is_code]
    code = [lang for lang in languages.LANGUAGES if lang.is_code]
    assert (len(natural), len(code)) == (46, 13)
    assert len(languages.BY_DIRECTORY) == len(languages.BY_TASK_NAME) == 59


def test_shares_follow_bloom_ratio_file():
    share = {lang.directory: lang.share for lang in languages.LANGUAGES}
    assert share["en"] == 30.31 and share["zh"] == 17.62 and share["fr"] == 13.05
    assert sum(lang.share for lang in languages.LANGUAGES if lang.is_code) == pytest.approx(13.03)
    niger_congo = [d for d, _, _ in languages._NIGER_CONGO]
    assert sum(share[d] for d in niger_congo) == pytest.approx(0.0316)
    assert share["sw"] > share["yo"] > share["tum"]
    assert sum(share.values()) == pytest.approx(100.0, abs=0.01)


def test_task_names_are_valid_seqio_names():
    for lang in languages.LANGUAGES:
        assert re.fullmatch(r"roots_[a-z_]+", lang.task_name), lang.task_name
    assert languages.lookup("zh-Hant").task_name == "roots_zh_hant"
    assert languages.lookup("roots_code_python").directory == "code/python"


def test_unknown_language_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown ROOTS language 'klingon'"):
        languages.lookup("klingon")


@pytest.mark.skipif(not SHARED_ROOTS_SAMPLE.is_dir(), reason="../shared ROOTS sample not present")
def test_roots_sample_names_are_in_the_table():
    names = [p.relative_to(SHARED_ROOTS_SAMPLE).with_suffix("").as_posix()
             for p in SHARED_ROOTS_SAMPLE.rglob("*.jsonl")]
    assert len(names) == 52
    for name in names:
        languages.lookup(name)


def test_default_rates_are_bloom_shares_renormalized():
    rates = languages.mixture_rates({"roots_en": 10, "roots_fr": 1, "roots_sw": 5})
    shares = {n: languages.BY_TASK_NAME[n].share for n in rates}
    assert rates == pytest.approx({n: s / sum(shares.values()) for n, s in shares.items()})


def test_alpha_rates():
    sizes = {"roots_en": 1000.0, "roots_fr": 10.0}
    assert languages.mixture_rates(sizes, alpha=1.0) == pytest.approx(
        {"roots_en": 1000 / 1010, "roots_fr": 10 / 1010})
    assert languages.mixture_rates(sizes, alpha=0.0) == pytest.approx({"roots_en": .5, "roots_fr": .5})
    low = languages.mixture_rates(sizes, alpha=0.3)
    assert low["roots_fr"] == pytest.approx(10**0.3 / (10**0.3 + 1000**0.3))


def test_explicit_rates_by_directory_name_choose_the_tasks(caplog):
    sizes = {"roots_en": 1, "roots_zh_hant": 1, "roots_fr": 1}
    with caplog.at_level(logging.WARNING):
        rates = languages.mixture_rates(sizes, rates={"en": 3, "zh-Hant": 1, "code/rust": 5})
    assert rates == {"roots_en": 0.75, "roots_zh_hant": 0.25}
    assert "roots_code_rust" in caplog.text


def test_bad_rates_are_errors():
    with pytest.raises(ValueError, match="either `rates` or `alpha`"):
        languages.mixture_rates({"roots_en": 1}, rates={"en": 1}, alpha=0.5)
    with pytest.raises(ValueError, match="positive sum"):
        languages.mixture_rates({"roots_en": 1}, rates={"en": 0})


def test_padded_vocab_size():
    assert languages.padded_vocab_size(1024) == 1024
    assert languages.padded_vocab_size(1025) == 1152
    assert languages.padded_vocab_size(250_680) == 250_752
    assert languages.padded_vocab_size(250_680, multiple=512) == 250_880  # BLOOM's embedding
