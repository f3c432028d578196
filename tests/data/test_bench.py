"""The data benchmark's stores: a prepared store's documents repeated, still a valid store."""

import numpy as np

from bloom_jax.data import bench
from bloom_jax.data import builder
from bloom_jax.data import store
from bloom_jax.data import tasks
from bloom_jax.data import tokenized


def test_repeated_store_holds_the_documents_again_and_again(tiny_corpus, vocabulary, tmp_path):
    found = tasks.roots_tasks(data_dir=tiny_corpus, vocabulary=vocabulary)
    manifest = builder.build(tmp_path / "prepared", found, vocabulary, workers=1)
    bench._repeated_store(tmp_path / "prepared", manifest, tmp_path / "x3", 3)
    for task in tokenized.load_tasks("train", None, vocabulary, tokens_dir=tmp_path / "x3")[1]:
        tokens, starts = map(np.asarray, store.split_arrays(tmp_path / "prepared", manifest,
                                                            task.name, "train"))
        np.testing.assert_array_equal(np.asarray(task.tokens), np.tile(tokens, 3))
        np.testing.assert_array_equal(
            np.asarray(task.starts),
            np.concatenate([starts, starts[1:] + len(tokens), starts[1:] + 2 * len(tokens)]))
