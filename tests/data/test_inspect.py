"""The inspect command: per-task documents, tokens, rate and observed share."""

import json

import pytest

from bloom_jax.data import inspect
from bloom_jax.data import languages
from bloom_jax.data import pipeline
from tests.data.helpers import mixture, write_jsonl
from tests.test_configs import run_command


def test_summary_counts_and_shares(train_tasks, seqio_tasks, vocabulary):
    rates = languages.mixture_rates({t.name: t.num_tokens for t in train_tasks})
    stream = pipeline.PackedStream(train_tasks, mixture(seqio_tasks, rates), vocabulary,
                                   sequence_length=8, batch_size=2000, seed=0, process_index=0,
                                   process_count=1)
    summary = inspect.summarize(stream)
    assert list(summary) == [t.name for t in train_tasks]
    for task in train_tasks:
        row = summary[task.name]
        assert (row["documents"], row["tokens"]) == (task.num_documents, task.num_tokens)
        assert row["rate"] == pytest.approx(rates[task.name], rel=1e-12)
        assert abs(row["observed"] - row["rate"]) < 2 / 2000  # Megatron's blending: 2 rows
    assert sum(row["observed"] for row in summary.values()) == pytest.approx(1.0)


def test_summary_shows_the_bad_records_of_the_store(tmp_path, vocabulary):
    write_jsonl(tmp_path / "en.jsonl", ["One document.", "Another document."])
    with open(tmp_path / "en.jsonl", "a") as f:
        f.write('{"text": cut short\n')
    stream = pipeline.make_stream(data_dir=tmp_path, vocabulary=vocabulary, sequence_length=8,
                                  batch_size=4, process_index=0, process_count=1)
    assert inspect.summarize(stream)["roots_en"]["bad_records"] == {"malformed JSON lines": 1}


@pytest.mark.slow
def test_command_line_json(tmp_path):
    gin_file = tmp_path / "data.gin"
    gin_file.write_text("include 'base.gin'\n"
                        "mixture_rates.alpha = 0.3\n"
                        "roots_tasks.languages_subset = ['en', 'fr', 'zh', 'sw']\n")
    result = run_command("data.inspect", f"--gin_file={gin_file}", "--num_examples=400",
                         "--gin.SEQUENCE_LENGTH=16", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert sorted(summary) == ["roots_en", "roots_fr", "roots_sw", "roots_zh"]
    assert sum(row["rate"] for row in summary.values()) == pytest.approx(1.0)
    assert all(set(row) == {"rate", "observed", "documents", "tokens", "bad_records"}
               for row in summary.values())
