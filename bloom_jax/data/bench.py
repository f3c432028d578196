"""Measures the data pipeline: packed tokens per second, or (--prepare) the token store.

  python -m bloom_jax.data.bench [--gin_file=FILE] [--data_dir=DIR] [--batch_size=64]
  python -m bloom_jax.data.bench --prepare [--data_dir=DIR] [--workers=N] [--small_store_mb=100]

Rows are as long as the config's SEQUENCE_LENGTH (gin_configs/base.gin's without --gin_file).

--prepare prints one JSON line: `prepare_mb_per_s` (text megabytes per second of a prepare with
every core, of the corpus's files linked --corpus_repeats times), `encode_batch_mb_per_s` (the
vocabulary's own batched encoder on the same texts, in memory, every core) and their ratio;
then `first_step_s` (the best of --startup_runs) and `peak_rss_mb` of `bloom_jax.train`
(tiny.gin, one step) reading a store of about --small_store_mb and one --large_factor times
larger, both made by repeating the prepared store's tokens; and the data's own share of that
start-up, measured in this process: `stream_first_batch_s` and `stream_alloc_mb` (the peak
memory the stream allocated).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Sequence

from absl import flags
import gin
import numpy as np

from bloom_jax import configs
from bloom_jax.data import builder
from bloom_jax.data import documents
from bloom_jax.data import pipeline
from bloom_jax.data import store
from bloom_jax.data import tasks
from bloom_jax.data import vocabularies
from bloom_jax.data import vocabulary_files

FLAGS = flags.FLAGS
_SHARD_TOKENS = 32 << 20  # tokens per shard of the repeated stores: a prepare's shard's worth


def define_flags() -> None:
    """Defines the command-line flags (only when run as a command, so modules import freely)."""
    configs.define_data_dir_flag()
    flags.DEFINE_integer("batch_size", 64, "Rows per batch (one process).")
    flags.DEFINE_integer("num_batches", 50, "Batches to time.")
    flags.DEFINE_bool("prepare", False, "Measure prepare and train start-up on token stores.")
    flags.DEFINE_integer("workers", None, "--prepare: processes (default: one per core).")
    flags.DEFINE_float("small_store_mb", 100, "--prepare: size of the small store.")
    flags.DEFINE_integer("large_factor", 20, "--prepare: the large store is this many times "
                         "the small one.")
    flags.DEFINE_string("work_dir", None, "--prepare: where the stores are written (and removed "
                        "after); default: the system's temporary folder.")
    flags.DEFINE_integer("corpus_repeats", 1, "--prepare: the corpus's files are prepared this "
                         "many times over (linked, not copied), for a corpus long enough to time.")
    flags.DEFINE_integer("startup_runs", 2, "--prepare: train start-ups per store; the fastest "
                         "counts.")


def bench_stream() -> None:
    start = time.perf_counter()
    stream = pipeline.make_stream(batch_size=FLAGS.batch_size, process_index=0, process_count=1)
    built = time.perf_counter() - start
    corpus_tokens = sum(task.num_tokens for task in stream.tasks)
    print(f"tokenized {corpus_tokens:,} tokens of {len(stream.tasks)} tasks in {built:.1f} s "
          f"({corpus_tokens / built:,.0f} tokens/s, once per run)")
    next(stream)  # warm the epoch orders
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        next(stream)
    elapsed = time.perf_counter() - start
    packed = FLAGS.num_batches * FLAGS.batch_size * stream.sequence_length
    print(f"packed {packed:,} tokens in {elapsed:.2f} s: {packed / elapsed:,.0f} tokens/s "
          f"(batch {FLAGS.batch_size} x {stream.sequence_length})")


def bench_prepare(work_dir: pathlib.Path) -> dict:
    """Prepare against the raw batched encoder, then train start-up on a small and large store."""
    vocabulary = pipeline.as_vocabulary(configs.macro("VOCABULARY"))
    corpus = _repeated_corpus(tasks.roots_tasks(data_dir=configs.macro("DATA_DIR"),
                                                vocabulary=vocabulary),
                              work_dir / "corpus", FLAGS.corpus_repeats)
    found = tasks.roots_tasks(data_dir=corpus, vocabulary=vocabulary)
    texts = [text for task in found.values() for split in store.SPLITS
             for text in task.source.documents(split)]
    text_mb = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    start = time.perf_counter()
    manifest = builder.build(work_dir / "prepared", found, vocabulary, workers=FLAGS.workers)
    prepare_s = time.perf_counter() - start
    encoder = vocabulary_files.open_vocabulary(vocabularies.vocabulary_file(vocabulary))
    start = time.perf_counter()
    encoder.encode_batch(texts, threads=os.cpu_count() or 1)
    encode_s = time.perf_counter() - start
    result = {"text_mb": round(text_mb, 2), "prepare_mb_per_s": round(text_mb / prepare_s, 3),
              "encode_batch_mb_per_s": round(text_mb / encode_s, 3)}
    result["prepare_to_encode_batch"] = round(encode_s / prepare_s, 3)
    del texts
    prepared_mb = _store_bytes(work_dir / "prepared") / 1e6
    copies = max(1, round(FLAGS.small_store_mb / prepared_mb))
    sizes = {"small": copies, "large": copies * FLAGS.large_factor}
    startups = {}
    _train_startup(_repeated_store(work_dir / "prepared", manifest, work_dir / "small", copies),
                   work_dir / "warm_up")  # loads the libraries into the page cache
    for name, repeats in sizes.items():
        root = _repeated_store(work_dir / "prepared", manifest, work_dir / name, repeats)
        runs = [_train_startup(root, work_dir / f"run_{name}")
                for _ in range(FLAGS.startup_runs)]
        startups[name] = {"store_mb": round(_store_bytes(root) / 1e6, 1),
                          "first_step_s": min(run["first_step_s"] for run in runs),
                          "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                          **_stream_startup(root)}
        shutil.rmtree(root)
    for key in ("store_mb", "first_step_s", "peak_rss_mb", "stream_first_batch_s",
                "stream_alloc_mb"):
        result[key] = {name: startups[name][key] for name in sizes}
        if key != "store_mb":
            result[key]["large_to_small"] = round(startups["large"][key] /
                                                  startups["small"][key], 3)
    return result


def _repeated_corpus(found: dict, root: pathlib.Path, repeats: int) -> pathlib.Path:
    """A corpus folder whose every language holds its files `repeats` times (symbolic links)."""
    for task in found.values():
        source = task.source
        folder = root / source.language.directory
        for split in store.SPLITS:
            if split == "validation" and not documents.has_validation_dir(source.data_dir,
                                                                          source.language):
                continue
            target = folder / (documents.VALIDATION_DIR if split == "validation" else "")
            target.mkdir(parents=True, exist_ok=True)
            for index, path in enumerate(documents.language_files(source.data_dir,
                                                                  source.language, split)):
                for repeat in range(repeats):
                    (target / f"{repeat}-{index}-{path.name}").symlink_to(path.resolve())
    return root


def _store_bytes(root: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.npy"))


def _repeated_store(prepared: pathlib.Path, manifest: dict, root: pathlib.Path,
                    repeats: int) -> pathlib.Path:
    """A store whose every task holds the prepared one's documents `repeats` times over, in
    shards of up to _SHARD_TOKENS tokens."""
    repeated = json.loads(json.dumps(manifest))
    for name, task in repeated["tasks"].items():
        arrays = {split: tuple(map(np.asarray, store.split_arrays(prepared, manifest, name,
                                                                   split)))
                  for split in store.SPLITS}
        per_shard = max(1, _SHARD_TOKENS // max(len(arrays["train"][0]), 1))
        info = {key: value for key, value in task["shards"][0].items()
                if key not in store.SPLITS}
        task["shards"] = []
        for first in range(0, repeats, per_shard):
            copies, shard = min(per_shard, repeats - first), f"{first:05d}"
            tiled = {split: _tiled(tokens.astype(manifest["dtype"]), starts, copies)
                     for split, (tokens, starts) in arrays.items()}
            task["shards"].append(store.write_shard(store.shard_folder(root, name, shard),
                                                    tiled, {**info, "name": shard}))
    store.write_manifest(root, repeated)
    return root


def _tiled(tokens: np.ndarray, starts: np.ndarray,
           copies: int) -> tuple[np.ndarray, np.ndarray]:
    """`copies` times the documents (tokens [n], starts [documents + 1]) one after another."""
    shifted = starts[1:][None, :] + len(tokens) * np.arange(copies)[:, None]
    return np.tile(tokens, copies), np.concatenate([[0], shifted.ravel()]).astype(np.int64)


def _train_startup(tokens_dir: pathlib.Path, model_dir: pathlib.Path) -> dict:
    """Seconds from launch to the first step's line, and the peak resident memory, of a
    one-step tiny.gin run reading `tokens_dir`."""
    command = [sys.executable, "-m", "bloom_jax.train", "--gin_file=gin_configs/tiny.gin",
               f"--gin.TOKENS_DIR={tokens_dir}", f"--gin.MODEL_DIR={model_dir}",
               "--gin.TRAIN_STEPS=1", "--gin.train.log_every=1"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=configs.GIN_CONFIGS_DIR.parent)
    peak = [0]
    watcher = threading.Thread(target=_watch_peak_rss, args=(process, peak), daemon=True)
    watcher.start()
    first_step, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if first_step is None and re.search(r"\bstep 1/1\b", line):
            first_step = time.perf_counter() - start
    process.wait()
    watcher.join()
    if process.returncode or first_step is None:
        raise RuntimeError(f"train on {tokens_dir} failed:\n{''.join(lines[-20:])}")
    shutil.rmtree(model_dir, ignore_errors=True)
    return {"first_step_s": round(first_step, 2), "peak_rss_mb": round(peak[0] / 1024, 1)}


def _stream_startup(tokens_dir: pathlib.Path) -> dict:
    """The data's share of a start-up, in this process: seconds to the first batch of tiny.gin's
    stream on `tokens_dir`, and the peak megabytes it allocated (tracemalloc sees numpy's
    arrays; the pages of the memory-mapped shards are the page cache's, not allocations)."""
    tracemalloc.start()
    start = time.perf_counter()
    with gin.unlock_config():
        gin.bind_parameter("load_tasks.tokens_dir", str(tokens_dir))
    next(pipeline.make_stream(batch_size=16, sequence_length=128, process_index=0,
                              process_count=1))
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"stream_first_batch_s": round(seconds, 3), "stream_alloc_mb": round(peak / 2**20, 1)}


def _watch_peak_rss(process: subprocess.Popen, peak: list[int]) -> None:
    """Keeps the process's peak resident set (VmHWM, kB) in peak[0] until it exits."""
    while process.poll() is None:
        try:
            status = pathlib.Path(f"/proc/{process.pid}/status").read_text()
            peak[0] = max(peak[0], int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.05)


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    # The data settings of a training config; the rest of it is not loaded here.
    configs.parse_flags(skip_unknown=True, default_file=configs.BASE_CONFIG)
    if not FLAGS.prepare:
        bench_stream()
        return
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="bloom_jax_bench_", dir=FLAGS.work_dir))
    try:
        print(json.dumps(bench_prepare(work_dir)))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    define_flags()
    configs.run(main)
