"""The prepare command: a store from a corpus on every core, with a progress line."""

import re

import numpy as np
import pytest

from bloom_jax.data import store
from bloom_jax.data import tasks
from bloom_jax.data import tokenized
from tests.test_configs import run_command


@pytest.mark.slow
def test_command_writes_a_store_that_readers_take(tiny_corpus, vocabulary, tmp_path):
    out = tmp_path / "tokens"
    result = run_command("data.prepare", f"--gin.DATA_DIR={tiny_corpus}",
                         f"--gin.TOKENS_DIR={out}", "--workers=2", "--shard_mb=0.0005")
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"prepare: \d+/\d+ shards \| [\d.]+ MB/s \| [\d.]+k? tokens/s \| ETA 0s",
                     result.stderr)
    assert "roots_en: " in result.stdout and (out / store.MANIFEST).is_file()
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)
    read = tokenized.load_tasks("train", None, vocabulary, tokens_dir=out)[1]
    for task in read:
        want = np.concatenate(list(tasks.encoded_documents(found[task.name], "train")))
        np.testing.assert_array_equal(np.asarray(task.tokens), want)


@pytest.mark.slow
def test_tokens_dir_is_required(tiny_corpus):
    result = run_command("data.prepare", f"--gin.DATA_DIR={tiny_corpus}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --gin.TOKENS_DIR=OUT is required")
