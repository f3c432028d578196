"""Builds a token store from a corpus: shards planned from the input bytes, tokenized by
processes on this machine or by Ray Data across a cluster, resumable after any crash.

Each language's input files are cut into shards of about `shard_bytes` input bytes (a JSON lines
file at line boundaries, other files whole), in file order. What a shard holds depends only on
its inputs and the vocabulary, never on the worker that made it or on the number of workers, so
the finished store is the same bytes however it was run. A shard already on disk that was made
from the same inputs is kept, so a killed build run again does only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from bloom_jax.data import documents
from bloom_jax.data import store
from bloom_jax.data import vocabulary_files

DEFAULT_SHARD_BYTES = 128 << 20  # input bytes per shard: about 30M tokens, a few seconds' work
_ENCODE_BATCH = 512  # documents per call of the batched encoder
ENGINES = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard to write: where, from which byte ranges of which files, with what."""

    root: str
    task: str
    name: str
    inputs: tuple[tuple[str, int, int], ...]  # (path, first byte, end byte)
    split: str | None  # the split every document goes to; None: held out by a hash of the text
    vocabulary_file: str
    eos_id: int
    planned: Mapping  # what the shard's shard.json holds when it is made from these inputs

    @property
    def input_bytes(self) -> int:
        return sum(end - start for _, start, end in self.inputs)


def _pieces(path: pathlib.Path, shard_bytes: int) -> list[tuple[str, int, int]]:
    """`path` as byte ranges of at most `shard_bytes` (JSON lines) or whole."""
    size = path.stat().st_size
    if path.suffix != ".jsonl" or size <= shard_bytes:
        return [(str(path), 0, size)]
    return [(str(path), start, min(start + shard_bytes, size))
            for start in range(0, size, shard_bytes)]


def plan(tasks: Mapping, vocabulary, root: str | os.PathLike,
         shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[list[ShardJob], dict]:
    """The shards of `tasks` (seqio Tasks of `tasks.roots_tasks`) and the manifest without them.

    A language with a `validation/` folder has shards of each split; otherwise each shard holds
    both splits, documents held out by the hash of their text.
    """
    # seqio and TensorFlow: imported by the caller already, never by the workers.
    from bloom_jax.data import vocabularies  # pylint: disable=g-import-not-at-top

    vocabulary_file = vocabularies.vocabulary_file(vocabulary)
    settings = {"vocabulary": store.file_sha256(vocabulary_file),
                "dtype": store.token_dtype(vocabulary.vocab_size).name}
    jobs, data_dirs, all_files, manifest_tasks = [], set(), [], {}
    for name, task in tasks.items():
        source = task.source
        data_dirs.add(str(source.data_dir))
        if documents.has_validation_dir(source.data_dir, source.language):
            groups = [(split, documents.language_files(source.data_dir, source.language, split))
                      for split in store.SPLITS]
        else:
            groups = [(None, documents.language_files(source.data_dir, source.language, "train"))]
        manifest_tasks[name] = {"language": source.language.directory,
                                "validation_fraction": source.validation_fraction}
        for split, files in groups:
            all_files += files
            pieces = [p for f in files for p in _pieces(f, shard_bytes)]
            for inputs in _pack(pieces, shard_bytes):
                relative = [[os.path.relpath(p, source.data_dir), a, b] for p, a, b in inputs]
                planned = {"inputs": relative, "split": split,
                           "validation_fraction": source.validation_fraction, **settings,
                           "sources": store.sources_fingerprint(
                               sorted({pathlib.Path(p) for p, _, _ in inputs}), source.data_dir)}
                jobs.append(ShardJob(str(root), name, f"{len(jobs):05d}", tuple(inputs), split,
                                     vocabulary_file, vocabulary.eos_id, planned))
    data_dir = data_dirs.pop() if len(data_dirs) == 1 else None
    head = {"format_version": store.FORMAT_VERSION, "data_dir": data_dir,
            "vocabulary": {"file": vocabulary_file, "sha256": settings["vocabulary"],
                           "size": vocabulary.vocab_size, "eos_id": vocabulary.eos_id},
            "dtype": settings["dtype"], "shard_bytes": shard_bytes,
            "sources": store.sources_fingerprint(sorted(set(all_files)), data_dir or "/"),
            "tasks": manifest_tasks}
    return jobs, head


def _pack(pieces: Sequence[tuple[str, int, int]],
          shard_bytes: int) -> Iterable[tuple[tuple[str, int, int], ...]]:
    """Consecutive pieces grouped into shards of at least `shard_bytes` (the last may be less)."""
    shard, size = [], 0
    for piece in pieces:
        shard.append(piece)
        size += piece[2] - piece[1]
        if size >= shard_bytes:
            yield tuple(shard)
            shard, size = [], 0
    if shard:
        yield tuple(shard)


def build(root: str | os.PathLike, tasks: Mapping, vocabulary, *, workers: int | None = None,
          engine: str = "local", shard_bytes: int = DEFAULT_SHARD_BYTES,
          log_every_s: float = 10.0) -> dict:
    """Writes the store of `tasks` at `root` (or finishes it) and returns its manifest.

    workers: processes on this machine (engine "local"; default one per core; 1 runs in this
    process with the batched encoder on every core). engine "ray": Ray Data tasks on the cluster
    of RAY_ADDRESS (a local one without it). One build at a time holds the store's lock; another
    process waits, then finds the store finished.
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    root = pathlib.Path(root)
    jobs, head = plan(tasks, vocabulary, root, shard_bytes)
    with store.locked(root):
        finished = {job.name: store.finished_shard(store.shard_folder(root, job.task, job.name),
                                                   job.planned) for job in jobs}
        pending = [job for job in jobs if finished[job.name] is None]
        manifest = store.read_manifest(root)
        if not pending and manifest == _manifest(head, jobs, finished):
            return manifest
        store.remove_temporaries(root)
        _remove_unplanned(root, jobs)
        progress = _Progress(pending, log_every_s)
        run = _run_on_ray if engine == "ray" else _run_locally
        for info in run(pending, workers):
            finished[info["name"]] = info
            progress.done(info)
        manifest = _manifest(head, jobs, finished)
        store.write_manifest(root, manifest)
    for name in manifest["tasks"]:
        skipped = documents.Skipped(store.bad_records(manifest, name))
        (logging.warning if skipped else logging.info)("%s: input skipped: %s.", name,
                                                       skipped.summary())
    return manifest


def _manifest(head: dict, jobs: Sequence[ShardJob], finished: Mapping[str, dict]) -> dict:
    manifest = json.loads(json.dumps(head))  # a deep copy
    for job in jobs:
        manifest["tasks"][job.task].setdefault("shards", []).append(finished[job.name])
    return manifest


def _remove_unplanned(root: pathlib.Path, jobs: Sequence[ShardJob]) -> None:
    """Removes shards and tasks the plan no longer has (a corpus that shrank, a language left
    out), so the store holds exactly what its manifest lists."""
    planned = {(job.task, job.name) for job in jobs}
    for folder in root.glob("*/*"):
        if folder.is_dir() and (folder.parent.name, folder.name) not in planned:
            shutil.rmtree(folder)
    for folder in root.iterdir():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _run_locally(jobs: Sequence[ShardJob], workers: int | None) -> Iterable[dict]:
    cores = os.cpu_count() or 1
    workers = min(workers or cores, max(len(jobs), 1))
    if workers == 1:
        yield from (build_shard(job, threads=cores) for job in jobs)
        return
    # forkserver: workers fork from a clean process that imported only this module (no
    # TensorFlow, no JAX threads of the caller); each job is one shard.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with _main_module_hidden():
        pool = context.Pool(workers, initializer=_single_threaded_tokenizers)
    with pool:
        yield from pool.imap_unordered(build_shard, jobs)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Starts processes that do not import the running command's module again, as
    multiprocessing otherwise does in each one (and with it TensorFlow, or the trainer): the
    workers run this module's functions only."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__spec__", "__file__") if key in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _single_threaded_tokenizers() -> None:
    """One thread per worker process: the processes already use every core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_on_ray(jobs: Sequence[ShardJob], workers: int | None) -> Iterable[dict]:
    import ray  # pylint: disable=g-import-not-at-top  # the `distributed` extra

    # Joins the cluster at RAY_ADDRESS, or starts one on this machine (without its dashboard).
    ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    dataset = ray.data.range(len(jobs), override_num_blocks=max(len(jobs), 1)).map(
        lambda row: {"info": json.dumps(build_shard(jobs[row["id"]]))}, num_cpus=1,
        concurrency=workers)
    for row in dataset.iter_rows():
        yield json.loads(row["info"])


def build_shard(job: ShardJob, threads: int = 1) -> dict:
    """Reads, tokenizes and writes one shard; returns its shard.json."""
    skipped = documents.Skipped()
    texts = {split: [] for split in store.SPLITS}
    validation_fraction = job.planned["validation_fraction"]
    for path, start, end in job.inputs:
        for text in documents.read_piece(pathlib.Path(path), start, end, skipped):
            split = job.split or ("validation" if documents.is_held_out(text, validation_fraction)
                                  else "train")
            texts[split].append(text)
    vocabulary = vocabulary_files.open_vocabulary(job.vocabulary_file)
    encode = functools.partial(vocabulary.encode_batch, threads=threads)
    dtype = np.dtype(job.planned["dtype"])
    splits = {split: _tokenize(texts[split], encode, job.eos_id, dtype) for split in texts}
    info = {**job.planned, "name": job.name, "skipped": dict(sorted(skipped.items())),
            "input_bytes": job.input_bytes}
    return store.write_shard(store.shard_folder(pathlib.Path(job.root), job.task, job.name),
                             splits, info)


def _tokenize(texts: Sequence[str], encode: Callable[[Sequence[str]], list[list[int]]],
              eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The documents' ids, each closed by EOS, concatenated [tokens], and their starts
    [documents + 1]."""
    tokens, lengths = [], []
    for first in range(0, len(texts), _ENCODE_BATCH):
        ids = encode(texts[first:first + _ENCODE_BATCH])
        batch = [len(i) + 1 for i in ids]
        lengths += batch
        tokens.append(np.fromiter(itertools.chain.from_iterable(i + [eos_id] for i in ids),
                                  dtype, count=sum(batch)))
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return (np.concatenate(tokens) if tokens else np.zeros([0], dtype)), starts


class _Progress:
    """Logs shards done, MB/s of input, tokens/s and the ETA, at most every `every_s`."""

    def __init__(self, jobs: Sequence[ShardJob], every_s: float):
        self._total_bytes = sum(job.input_bytes for job in jobs)
        self._total = len(jobs)
        self._every_s = every_s
        self._start = self._last = time.perf_counter()
        self._count = self._bytes = self._tokens = 0

    def done(self, info: Mapping) -> None:
        from bloom_jax import metrics  # pylint: disable=g-import-not-at-top  # jax: main only

        self._count += 1
        self._bytes += info["input_bytes"]
        self._tokens += sum(info[split]["tokens"] for split in store.SPLITS)
        now = time.perf_counter()
        if now - self._last < self._every_s and self._count < self._total:
            return
        self._last, elapsed = now, max(now - self._start, 1e-9)
        rate = self._bytes / elapsed
        eta = (self._total_bytes - self._bytes) / rate if rate else 0.0
        logging.info("prepare: %d/%d shards | %.1f MB/s | %s tokens/s | ETA %s", self._count,
                     self._total, rate / 1e6, metrics.human(self._tokens / elapsed),
                     metrics.format_duration(eta))
