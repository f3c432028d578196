"""The token store's reader: lazy arrays over shards, and one-line errors for a store that
cannot be read as it is."""

import json

import numpy as np
import pytest

from bloom_jax.data import builder
from bloom_jax.data import hf_tokenizer
from bloom_jax.data import store
from bloom_jax.data import tasks
from bloom_jax.data import tokenized
from bloom_jax.data import vocabularies
from bloom_jax.data import vocabulary_files
from tests.test_configs import run_command


@pytest.fixture
def prepared(tiny_corpus, vocabulary, tmp_path):
    """The tiny corpus in a store of several shards: (root, manifest)."""
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)
    root = tmp_path / "store"
    return root, builder.build(root, found, vocabulary, workers=1, shard_bytes=300)


def test_tokens_index_like_an_array_across_shards(prepared):
    root, manifest = prepared
    tokens, starts = store.split_arrays(root, manifest, "roots_en", "train")
    whole = np.asarray(tokens)
    assert len(manifest["tasks"]["roots_en"]["shards"]) > 2 and len(whole) == len(tokens)
    index = np.random.default_rng(0).integers(0, len(whole), [7, 5])
    np.testing.assert_array_equal(tokens[index], whole[index])
    np.testing.assert_array_equal(tokens[3:len(whole) - 2], whole[3:-2])
    assert tokens[-1] == whole[-1] and tokens[10:10].shape == (0,)
    assert len(starts) == len(np.asarray(starts)) and starts[-1] == len(whole)


def _read(root, vocabulary):
    return [np.asarray(t.tokens) for t in tokenized.load_tasks("train", None, vocabulary,
                                                                tokens_dir=root)[1]]


def test_tokens_dir_without_manifest(tmp_path, vocabulary):
    with pytest.raises(store.StoreError, match=f"TOKENS_DIR {tmp_path} has no manifest.json: "
                       "it is not a finished token store. Run `python -m bloom_jax.data.prepare"):
        _read(tmp_path, vocabulary)


def test_store_of_another_vocabulary(prepared, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(hf_tokenizer.tokenizer_json(vocabulary_files.open_vocabulary()))
    with pytest.raises(store.StoreError, match=r"was made with the vocabulary .*sentencepiece"
                       r"\.model .*not with .*tokenizer\.json: set --gin\.VOCABULARY"):
        _read(prepared[0], vocabularies.load_vocabulary(path))


def _shard(root, index=1):
    return sorted(root.glob("roots_en/*"))[index]


def test_missing_shard(prepared, vocabulary):
    root, _ = prepared
    (_shard(root) / "train.tokens.npy").unlink()
    with pytest.raises(store.StoreError, match=f"shard {_shard(root)} is missing "
                       "train.tokens.npy: run the same `python -m bloom_jax.data.prepare` again"):
        _read(root, vocabulary)


def test_truncated_shard(prepared, vocabulary):
    root, _ = prepared
    with open(_shard(root) / "train.tokens.npy", "r+b") as f:
        f.truncate(130)
    with pytest.raises(store.StoreError, match=f"shard {_shard(root)}: train.tokens.npy has "
                       r"130 bytes, the manifest says \d+ \(truncated or replaced\)"):
        _read(root, vocabulary)


def test_manifest_that_does_not_match_its_shards(prepared, vocabulary):
    root, manifest = prepared
    manifest["tasks"]["roots_en"]["shards"][1]["train"]["tokens"] += 1
    (root / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.StoreError, match=r"the manifest says \d+ \(the manifest does not "
                       "match its shards\)"):
        _read(root, vocabulary)


@pytest.mark.slow
def test_commands_report_a_bad_store_in_one_line(tmp_path):
    result = run_command("data.inspect", f"--gin.TOKENS_DIR={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: TOKENS_DIR {tmp_path} has no manifest.json")
