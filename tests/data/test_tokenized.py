"""Tasks read from a token store: a raw corpus tokenized once into MODEL_DIR/tokens, a prepared
store given as TOKENS_DIR, and the same batches either way."""

import threading
import time

import gin
import numpy as np

from bloom_jax.data import builder
from bloom_jax.data import languages
from bloom_jax.data import pipeline
from bloom_jax.data import store
from bloom_jax.data import tasks
from bloom_jax.data import tokenized
from tests.data.helpers import mixture, write_jsonl


def _load(corpus, vocabulary, model_dir, split="train"):
    return {t.name: t for t in tokenized.load_tasks(split, corpus, vocabulary,
                                                    model_dir=model_dir)[1]}


def _count_shards_built(monkeypatch) -> list[str]:
    built, original = [], builder.build_shard
    monkeypatch.setattr(builder, "build_shard",
                        lambda job, **kw: built.append(job.name) or original(job, **kw))
    return built


def test_raw_corpus_is_tokenized_once_into_model_dir(tiny_corpus, vocabulary, tmp_path,
                                                     monkeypatch):
    built = _count_shards_built(monkeypatch)
    first = _load(tiny_corpus, vocabulary, tmp_path)
    assert (tmp_path / "tokens" / store.MANIFEST).is_file() and len(built) == 3
    again = _load(tiny_corpus, vocabulary, tmp_path)
    assert _load(tiny_corpus, vocabulary, tmp_path, "validation")["roots_fr"].num_documents == 1
    assert len(built) == 3  # read, not tokenized again
    for name, task in first.items():
        np.testing.assert_array_equal(np.asarray(again[name].tokens), np.asarray(task.tokens))
        np.testing.assert_array_equal(np.asarray(again[name].starts), np.asarray(task.starts))


def test_changed_corpus_is_tokenized_again(tiny_corpus, vocabulary, tmp_path, monkeypatch):
    before = _load(tiny_corpus, vocabulary, tmp_path)["roots_en"]
    built = _count_shards_built(monkeypatch)
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_jsonl(tiny_corpus / "en.jsonl", ["Only one document now."])
    after = _load(tiny_corpus, vocabulary, tmp_path)["roots_en"]
    assert before.num_documents > 1 and after.num_documents == 1
    assert len(built) == 1  # French did not change


def test_concurrent_readers_tokenize_once_and_read_the_same(tiny_corpus, vocabulary, tmp_path,
                                                            monkeypatch):
    built = _count_shards_built(monkeypatch)
    results = [None, None]

    def read(i):
        results[i] = _load(tiny_corpus, vocabulary, tmp_path)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 3  # one process wrote, the other waited for the lock, then read
    for name, task in results[0].items():
        np.testing.assert_array_equal(np.asarray(results[1][name].tokens),
                                      np.asarray(task.tokens))


def test_batches_from_a_store_equal_batches_from_the_raw_corpus(tiny_corpus, vocabulary,
                                                                tmp_path):
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)
    builder.build(tmp_path / "store", found, vocabulary, workers=1, shard_bytes=300)
    make = lambda: pipeline.make_stream(data_dir=tiny_corpus, vocabulary=vocabulary,
                                        sequence_length=16, batch_size=8, seed=3,
                                        process_index=0, process_count=1)
    raw = make()
    gin.bind_parameter("load_tasks.tokens_dir", str(tmp_path / "store"))
    stored = make()
    # The same stream over tasks tokenized in memory, one document at a time.
    in_memory = [tokenized.TokenizedTask(name, np.concatenate(docs),
                                         np.concatenate([[0], np.cumsum(list(map(len, docs)))]))
                 for name, docs in ((name, list(tasks.encoded_documents(task, "train")))
                                    for name, task in found.items())]
    rates = languages.mixture_rates({t.name: t.num_tokens for t in in_memory})
    reference = pipeline.PackedStream(in_memory, mixture(found, rates), vocabulary,
                                      sequence_length=16, batch_size=8, seed=3,
                                      process_index=0, process_count=1)
    for _ in range(5):
        want = next(reference)
        for batch in (next(raw), next(stored)):
            for key, value in want.items():
                np.testing.assert_array_equal(batch[key], value, err_msg=key)
