"""Building a token store: the tokens of an in-memory tokenization, the same bytes whatever the
workers, the engine or a SIGKILL in the middle, and only missing shards redone."""

import functools
import multiprocessing
import os
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest

from bloom_jax.data import builder
from bloom_jax.data import hf_tokenizer
from bloom_jax.data import store
from bloom_jax.data import tasks
from bloom_jax.data import vocabularies
from bloom_jax.data import vocabulary_files
from tests.data.helpers import SHARED_ROOTS_SAMPLE, write_jsonl

needs_sample = pytest.mark.skipif(not SHARED_ROOTS_SAMPLE.is_dir(),
                                  reason="../shared ROOTS sample not present")
# A few languages of the sample in shards of ~20 kB: dozens of shards, a few seconds' work.
SUBSET = ["sw", "yo", "code/python"]
SMALL_SHARDS = 20_000


def files_of(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def in_memory(task, split):
    """The task's split tokenized one document at a time, in memory: (tokens, starts)."""
    pieces = list(tasks.encoded_documents(task, split))
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    return (np.concatenate(pieces) if pieces else np.zeros([0], np.int32)), starts


def assert_store_holds(root, manifest, found):
    for name, task in found.items():
        for split in store.SPLITS:
            tokens, starts = store.split_arrays(root, manifest, name, split)
            want_tokens, want_starts = in_memory(task, split)
            np.testing.assert_array_equal(np.asarray(tokens), want_tokens, err_msg=name)
            np.testing.assert_array_equal(np.asarray(starts), want_starts, err_msg=name)


@needs_sample
@pytest.mark.slow
def test_store_equals_in_memory_tokenization_of_the_sample(tmp_path, vocabulary):
    found = tasks.roots_tasks(data_dir=SHARED_ROOTS_SAMPLE, vocabulary=vocabulary)
    manifest = builder.build(tmp_path, found, vocabulary, workers=1, shard_bytes=1 << 20)
    assert sorted(manifest["tasks"]) == sorted(found)
    assert manifest["dtype"] == "uint16"
    assert np.load(next(tmp_path.rglob("train.tokens.npy"))).dtype == np.uint16
    assert_store_holds(tmp_path, manifest, found)


def test_tokenizer_json_vocabulary_and_split_files(tmp_path, tiny_corpus):
    """tokenizers' encode_batch gives the ids of its one-document encode; a jsonl file cut into
    pieces at arbitrary bytes loses and repeats no line."""
    path = tmp_path / "tokenizer.json"
    path.write_text(hf_tokenizer.tokenizer_json(vocabulary_files.open_vocabulary()))
    json_vocabulary = vocabularies.load_vocabulary(path)
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=json_vocabulary)
    manifest = builder.build(tmp_path / "store", found, json_vocabulary, workers=1,
                             shard_bytes=100)
    assert len(manifest["tasks"]["roots_en"]["shards"]) > 5
    assert_store_holds(tmp_path / "store", manifest, found)


def test_malformed_records_are_counted_per_shard(tmp_path, vocabulary):
    write_jsonl(tmp_path / "en.jsonl", ["One.", "Two."])
    with open(tmp_path / "en.jsonl", "a") as f:
        f.write('{"text": broken\n{"title": "no text"}\n')
    found = tasks.roots_tasks(data_dir=tmp_path, vocabulary=vocabulary)
    manifest = builder.build(tmp_path / "store", found, vocabulary, workers=1)
    assert store.bad_records(manifest, "roots_en") == {"malformed JSON lines": 1,
                                                       "records without a text string": 1}


def _subset(vocabulary):
    return tasks.roots_tasks(data_dir=SHARED_ROOTS_SAMPLE, vocabulary=vocabulary,
                             languages_subset=SUBSET)


@needs_sample
@pytest.mark.slow
def test_one_and_two_workers_write_the_same_bytes(tmp_path, vocabulary):
    found = _subset(vocabulary)
    for workers in (1, 2):
        builder.build(tmp_path / str(workers), found, vocabulary, workers=workers,
                      shard_bytes=SMALL_SHARDS)
    one, two = files_of(tmp_path / "1"), files_of(tmp_path / "2")
    assert len(one) > 40 and one == two


@needs_sample
def test_rerun_redoes_only_missing_and_damaged_shards(tmp_path, vocabulary, monkeypatch):
    found = _subset(vocabulary)
    builder.build(tmp_path, found, vocabulary, workers=1, shard_bytes=SMALL_SHARDS)
    before = files_of(tmp_path)
    shards = sorted(p for p in tmp_path.glob("*/*") if p.is_dir())
    shutil.rmtree(shards[3])
    with open(shards[7] / "train.tokens.npy", "r+b") as f:
        f.truncate(100)
    built = []
    original = builder.build_shard
    monkeypatch.setattr(builder, "build_shard",
                        lambda job, **kw: built.append(job.name) or original(job, **kw))
    builder.build(tmp_path, found, vocabulary, workers=1, shard_bytes=SMALL_SHARDS)
    assert sorted(built) == [shards[3].name, shards[7].name]
    assert files_of(tmp_path) == before
    builder.build(tmp_path, found, vocabulary, workers=1, shard_bytes=SMALL_SHARDS)
    assert len(built) == 2  # a finished store is left as it is


def _finished_shards(root: pathlib.Path) -> int:
    return sum(1 for p in root.glob("*/*") if p.is_dir() and ".tmp-" not in p.name)


@needs_sample
def test_build_killed_at_several_points_then_rerun_gives_the_same_bytes(tmp_path, vocabulary):
    """A process building the store is SIGKILLed after 1, a third and two thirds of the shards
    (maybe mid-shard); each run goes on from where the last one stopped."""
    found = _subset(vocabulary)
    build = functools.partial(builder.build, tasks=found, vocabulary=vocabulary, workers=1,
                              shard_bytes=SMALL_SHARDS)
    build(tmp_path / "whole")
    total = _finished_shards(tmp_path / "whole")
    killed = tmp_path / "killed"
    fork = multiprocessing.get_context("fork")  # the child only reads, encodes and writes
    for point in (1, total // 3, 2 * total // 3):  # shards finished when SIGKILL comes
        process = fork.Process(target=build, args=(killed,))
        process.start()
        while _finished_shards(killed) < point and process.is_alive():
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        assert not (killed / store.MANIFEST).exists()
    assert 0 < _finished_shards(killed) < total
    build(killed)
    assert files_of(killed) == files_of(tmp_path / "whole")


@needs_sample
@pytest.mark.slow
def test_ray_engine_writes_the_same_bytes(tmp_path, vocabulary):
    found = tasks.roots_tasks(data_dir=SHARED_ROOTS_SAMPLE, vocabulary=vocabulary,
                              languages_subset=["sw"])
    for engine in ("local", "ray"):
        builder.build(tmp_path / engine, found, vocabulary, workers=2, engine=engine,
                      shard_bytes=SMALL_SHARDS)
    local, ray = files_of(tmp_path / "local"), files_of(tmp_path / "ray")
    assert len(local) > 10 and local == ray
