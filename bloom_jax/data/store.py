"""The token store: each language's documents as token ids in shards, with a manifest.

    TOKENS_DIR/manifest.json                      vocabulary and sources fingerprints, shards
    TOKENS_DIR/<task>/<shard>/<split>.tokens.npy  [tokens] uint16 (uint32 past 65,536 ids)
    TOKENS_DIR/<task>/<shard>/<split>.starts.npy  [documents + 1] int64 offsets into the tokens
    TOKENS_DIR/<task>/<shard>/shard.json          what the shard was made from, and its counts

A shard holds the documents of a range of its language's input bytes, each closed by EOS, in
file order; both splits of that range. Shards are written to a temporary folder and renamed
into place, so a shard folder that exists is complete; the manifest is written last, the same
way. Shards are memory-mapped `.npy` files read lazily (a row costs microseconds, against a
tenth of a millisecond through tensorstore; README, "Token store"). Opening a store reads the
manifest only; a shard is checked against it and mapped on first use.

This module imports no TensorFlow, so the workers that write shards start in a fraction of a
second.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import socket
from typing import Iterator, Mapping, Sequence

import numpy as np

MANIFEST = "manifest.json"
SHARD_INFO = "shard.json"
SPLITS = ("train", "validation")
FORMAT_VERSION = 1
_TEMPORARY = ".tmp-"  # infix of a shard folder or manifest being written
_MAPPED = 64  # shard files kept mapped per task and split


class StoreError(ValueError):
    """A token store that cannot be read as it is: missing, damaged or of another vocabulary."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sources_fingerprint(paths: Sequence[pathlib.Path], relative_to: str | os.PathLike) -> str:
    """A digest of the files' names (relative to `relative_to`), sizes and modification times
    (not their bytes: a terabyte corpus is not read twice to learn it has not changed)."""
    stats = [(os.path.relpath(p, relative_to), p.stat().st_size, p.stat().st_mtime_ns)
             for p in paths]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def shard_folder(root: pathlib.Path, task: str, shard: str) -> pathlib.Path:
    return root / task / shard


def write_shard(folder: pathlib.Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                info: dict) -> dict:
    """Writes one shard atomically: `splits` maps a split to (tokens, starts); returns `info`
    with each split's documents, tokens and file sizes, as `shard.json` holds it."""
    writer = f"{socket.gethostname()}-{os.getpid()}"
    temporary = folder.with_name(f"{folder.name}{_TEMPORARY}{writer}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    info = dict(info)
    for split in SPLITS:
        tokens, starts = splits[split]
        for kind, array in (("tokens", tokens), ("starts", starts)):
            np.save(temporary / f"{split}.{kind}.npy", array)
        info[split] = {"documents": len(starts) - 1, "tokens": len(tokens),
                       **{f"{kind}_bytes": (temporary / f"{split}.{kind}.npy").stat().st_size
                          for kind in ("tokens", "starts")}}
    _write_json(temporary / SHARD_INFO, info)
    if folder.exists():  # an earlier, stale version of this shard: replace it
        shutil.rmtree(folder)
    os.rename(temporary, folder)
    return info


def finished_shard(folder: pathlib.Path, planned: Mapping) -> dict | None:
    """The shard's `shard.json` if the shard is complete and was made from `planned` (same
    inputs, vocabulary and settings), else None."""
    try:
        info = json.loads((folder / SHARD_INFO).read_text())
    except (OSError, ValueError):
        return None
    if any(info.get(key) != value for key, value in planned.items()):
        return None
    for split in SPLITS:
        for kind in ("tokens", "starts"):
            path = folder / f"{split}.{kind}.npy"
            if not path.is_file() or path.stat().st_size != info[split][f"{kind}_bytes"]:
                return None
    return info


def remove_temporaries(root: pathlib.Path) -> None:
    """Removes what a killed writer left half-written (call with the store's lock held)."""
    for path in root.glob(f"*/*{_TEMPORARY}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f"{MANIFEST}{_TEMPORARY}*"):
        path.unlink(missing_ok=True)


def write_manifest(root: pathlib.Path, manifest: dict) -> None:
    _write_json(root / MANIFEST, manifest)


def _write_json(path: pathlib.Path, value) -> None:
    """Writes JSON atomically (a temporary file renamed into place)."""
    temporary = path.with_name(f"{path.name}{_TEMPORARY}{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


@contextlib.contextmanager
def locked(root: pathlib.Path) -> Iterator[None]:
    """Holds the store's lock: one writer at a time; the kernel releases it if the holder dies,
    so a crashed writer never leaves the others waiting."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(root: pathlib.Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def open_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the store at `root`; a one-line error if there is none."""
    root = pathlib.Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise StoreError(
            f"TOKENS_DIR {root} has no {MANIFEST}: it is not a finished token store. Run "
            f"`python -m bloom_jax.data.prepare --gin.DATA_DIR=CORPUS --gin.TOKENS_DIR={root}` "
            "(a prepare that was stopped finishes when run again), or unset TOKENS_DIR.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"Token store {root} has format {manifest.get('format_version')}, this "
                         f"version reads {FORMAT_VERSION}: prepare it again.")
    return manifest


def check_vocabulary(root: pathlib.Path, manifest: Mapping, vocabulary_file: str) -> None:
    """Raises unless the store was made with the vocabulary in `vocabulary_file`."""
    made_with = manifest["vocabulary"]
    if file_sha256(vocabulary_file) != made_with["sha256"]:
        raise StoreError(
            f"Token store {root} was made with the vocabulary {made_with['file']} (sha256 "
            f"{made_with['sha256'][:12]}), not with {vocabulary_file}: set --gin.VOCABULARY to "
            f"the store's vocabulary, or prepare a store for this one (python -m "
            f"bloom_jax.data.prepare --gin.VOCABULARY={vocabulary_file} --gin.TOKENS_DIR=NEW).")


class _Shards:
    """One split's shards of one task: their sizes from the manifest, files mapped on first use.

    A shard whose files are missing, of another size than the manifest says, or holding other
    counts, raises a one-line `StoreError` naming it.
    """

    def __init__(self, root: pathlib.Path, task: str, shards: Sequence[Mapping], split: str):
        self._root = root
        self._split = split
        self.infos = [s for s in shards if s[split]["documents"]]
        self.folders = [shard_folder(root, task, s["name"]) for s in self.infos]
        self._arrays = collections.OrderedDict()  # the most recently read, at most _MAPPED

    def array(self, index: int, kind: str) -> np.ndarray:
        """The memory-mapped `kind` ("tokens" or "starts") array of shard `index`."""
        key = (index, kind)
        if key in self._arrays:
            self._arrays.move_to_end(key)
        else:
            self._arrays[key] = self._load(index, kind)
            if len(self._arrays) > _MAPPED:  # each map holds a file descriptor
                self._arrays.popitem(last=False)
        return self._arrays[key]

    def _load(self, index: int, kind: str) -> np.ndarray:
        info, folder = self.infos[index][self._split], self.folders[index]
        path = folder / f"{self._split}.{kind}.npy"
        fix = ("run the same `python -m bloom_jax.data.prepare` again to rewrite it (it redoes "
               "only missing or damaged shards)")
        if not path.is_file():
            raise StoreError(f"Token store shard {folder} is missing {path.name}: {fix}.")
        size = path.stat().st_size
        if size != info[f"{kind}_bytes"]:
            raise StoreError(f"Token store shard {folder}: {path.name} has {size} bytes, the "
                             f"manifest says {info[f'{kind}_bytes']} (truncated or replaced): "
                             f"{fix}.")
        array = np.load(path, mmap_mode="r")
        expected = info["tokens"] if kind == "tokens" else info["documents"] + 1
        if array.ndim != 1 or len(array) != expected:
            raise StoreError(f"Token store shard {folder}: {path.name} holds {len(array)} "
                             f"entries, the manifest says {expected} (the manifest does not match "
                             f"its shards): {fix}.")
        return array


class Tokens:
    """A split's token ids over its shards, indexed like a 1-D int32 array (an integer, a slice
    or an integer array) and read on demand through memory maps."""

    def __init__(self, shards: _Shards):
        self._shards = shards
        counts = [s[shards._split]["tokens"] for s in shards.infos]
        self._ends = np.cumsum(counts, dtype=np.int64)  # [shards]
        self.shape = (int(self._ends[-1]) if counts else 0,)
        self.dtype = np.dtype(np.int32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, stop)
        index = np.asarray(key)
        if index.ndim == 0:
            return int(self._gather(index.reshape(1))[0])
        return self._gather(index)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        del copy  # always a fresh array
        return self[:].astype(dtype or self.dtype, copy=False)

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        first = int(np.searchsorted(self._ends, start, side="right"))
        for shard in range(first, len(self._ends)):
            begin = self._ends[shard - 1] if shard else 0
            if begin >= stop:
                break
            tokens = self._shards.array(shard, "tokens")
            pieces.append(tokens[max(start - begin, 0):stop - begin])
        return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros([0], np.int32)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        shard = np.searchsorted(self._ends, index, side="right")  # [n]
        out = np.empty(index.shape, np.int32)
        for s in np.unique(shard):
            picked = shard == s
            begin = self._ends[s - 1] if s else 0
            out[picked] = self._shards.array(int(s), "tokens")[index[picked] - begin]
        return out


class Starts:
    """A split's document offsets into its `Tokens`, [documents + 1] int64: the length comes
    from the manifest, the offsets are read from the shards when first used."""

    def __init__(self, shards: _Shards):
        self._shards = shards
        self._documents = sum(s[shards._split]["documents"] for s in shards.infos)

    def __len__(self) -> int:
        return self._documents + 1

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        pieces, offset = [np.zeros([1], np.int64)], 0
        for shard in range(len(self._shards.infos)):
            starts = np.asarray(self._shards.array(shard, "starts"), np.int64)
            pieces.append(starts[1:] + offset)
            offset += int(starts[-1])
        return np.concatenate(pieces)

    def __getitem__(self, key):
        return self._offsets[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        del copy
        return self._offsets.astype(dtype or np.int64, copy=False)


def split_arrays(root: pathlib.Path, manifest: Mapping, task: str,
                 split: str) -> tuple[Tokens, Starts]:
    """The lazily read tokens and document starts of one task's split."""
    shards = _Shards(root, task, manifest["tasks"][task]["shards"], split)
    return Tokens(shards), Starts(shards)


def bad_records(manifest: Mapping, task: str) -> dict[str, int]:
    """The input the prepare skipped for `task`, by reason (malformed JSON lines, ...)."""
    total = {}
    for shard in manifest["tasks"][task]["shards"]:
        for reason, count in shard["skipped"].items():
            total[reason] = total.get(reason, 0) + count
    return total
