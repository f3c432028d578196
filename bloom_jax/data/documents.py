"""Reading documents from a ROOTS-style corpus folder, counting (never hiding) bad input.

A language's documents live in `<data_dir>/<directory>.jsonl` / `.parquet` or in any
`*.jsonl` / `*.parquet` file under `<data_dir>/<directory>/`; for a code language, source files
with its suffixes (`*.py`, ...) there are documents too, one file each. A `validation/`
subfolder, when present, holds the validation split; otherwise a fixed fraction of the documents,
chosen by a hash of their text, is held out so the split does not depend on file order.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import zlib
from typing import Iterator, Sequence

from bloom_jax.data.languages import Language

DEFAULT_CORPUS_DIR = pathlib.Path(__file__).parent / "default_corpus"  # shipped with the package
VALIDATION_DIR = "validation"
_TEXT_SUFFIXES = (".jsonl", ".parquet")
# In the default corpus, the Python task also reads the package's own sources.
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_CORPUS_SOURCES = {"code/python": _PACKAGE_DIR}


class Skipped(collections.Counter):
    """Counts of input skipped while reading, by reason (`malformed JSON line`, ...)."""

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.items())) or "nothing skipped"


def language_files(data_dir: pathlib.Path, language: Language, split: str) -> list[pathlib.Path]:
    """The files holding `language` for `split` ("train" or "validation"), sorted; [] if absent.

    In the default corpus, the Python task also reads the package's own sources.
    """
    suffixes = _TEXT_SUFFIXES + language.extensions
    folder = data_dir / language.directory
    if split == "validation" and (folder / VALIDATION_DIR).is_dir():
        return _files_under(folder / VALIDATION_DIR, suffixes)
    single = [data_dir / f"{language.directory}{s}" for s in _TEXT_SUFFIXES]
    files = [f for f in single if f.is_file()]
    if folder.is_dir():
        files += [f for f in _files_under(folder, suffixes) if VALIDATION_DIR not in
                  f.relative_to(folder).parts[:-1]]
    extra = _DEFAULT_CORPUS_SOURCES.get(language.directory)
    if extra and data_dir.resolve() == DEFAULT_CORPUS_DIR.resolve():
        files += sorted(f for f in extra.rglob("*.py") if f.stat().st_size)  # not empty __init__
    return sorted(files)


def has_validation_dir(data_dir: pathlib.Path, language: Language) -> bool:
    return (data_dir / language.directory / VALIDATION_DIR).is_dir()


def _files_under(folder: pathlib.Path, suffixes: Sequence[str]) -> list[pathlib.Path]:
    if not os.access(folder, os.R_OK | os.X_OK):
        raise PermissionError(f"Cannot read corpus folder {folder}: check its permissions.")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))


def read_documents(files: Sequence[pathlib.Path], skipped: Skipped) -> Iterator[str]:
    """Yields the non-empty document texts of `files`; bad input is counted in `skipped`."""
    for path in files:
        yield from read_piece(path, 0, None, skipped)


def read_piece(path: pathlib.Path, start: int, end: int | None,
               skipped: Skipped) -> Iterator[str]:
    """The non-empty document texts of `path` whose records begin in bytes [start, end) (a JSON
    lines file can be cut into pieces anywhere; other files are read whole, from start 0)."""
    if start == 0 and path.stat().st_size == 0:
        skipped["empty files"] += 1
        return
    if path.suffix == ".jsonl":
        texts = (text for text, in jsonl_records(path, ("text",), skipped, start, end))
    elif path.suffix == ".parquet":
        texts = _parquet_texts(path, skipped)
    else:
        texts = _source_file_text(path, skipped)
    for text in texts:
        if text:
            yield text
        else:
            skipped["empty documents"] += 1


def is_held_out(text: str, validation_fraction: float) -> bool:
    """Whether a document belongs to the held-out validation split (stable hash of its text)."""
    return zlib.crc32(text.encode("utf-8")) % 100_000 < validation_fraction * 100_000


def jsonl_records(path: pathlib.Path, fields: Sequence[str], skipped: Skipped, start: int = 0,
                  end: int | None = None) -> Iterator[tuple[str, ...]]:
    """The string `fields` of each record of a JSON-lines file (of the lines that begin in bytes
    [start, end)); bad lines are counted in `skipped` (a record missing a field, or holding a
    non-string, is bad)."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line under way at `start` belongs to the piece before
        position = f.tell()
        for raw in f:
            if end is not None and position >= end:
                break
            position += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["lines of invalid UTF-8"] += 1
                continue
            except json.JSONDecodeError:
                skipped["malformed JSON lines"] += 1
                continue
            values = tuple(record.get(f) for f in fields) if isinstance(record, dict) else (None,)
            if not all(isinstance(value, str) for value in values):
                skipped[f"records without a {' and '.join(fields)} string"] += 1
                continue
            yield values


def _parquet_texts(path: pathlib.Path, skipped: Skipped) -> Iterator[str | None]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only for parquet corpora

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(f"Parquet file {path} has no 'text' column (columns: "
                         f"{parquet.schema_arrow.names}); store each document's text in 'text'.")
    for batch in parquet.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, bytes):  # a binary column: decode like a jsonl line
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["records of invalid UTF-8"] += 1
                    continue
            if isinstance(text, str):
                yield text
            else:
                skipped["records without a text string"] += 1


def _source_file_text(path: pathlib.Path, skipped: Skipped) -> Iterator[str | None]:
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["source files of invalid UTF-8"] += 1


def resolve_data_dir(data_dir: str | pathlib.Path | None) -> pathlib.Path:
    """`data_dir` as a checked path; None means the default corpus shipped with the package."""
    path = pathlib.Path(data_dir) if data_dir else DEFAULT_CORPUS_DIR
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"Corpus folder {path} {problem}; set DATA_DIR (--gin.DATA_DIR=... for the "
            "trainer, --data_dir for the data tools) to a ROOTS-style folder "
            "(<data_dir>/<language>.jsonl or <data_dir>/<language>/*.jsonl|*.parquet).")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"Cannot read corpus folder {path}: check its permissions.")
    return path


def language_documents(data_dir: pathlib.Path, language: Language, split: str,
                       validation_fraction: float) -> Iterator[str]:
    """The texts of one language and split in file order; skipped input is counted and logged."""
    held_out_by_hash = not has_validation_dir(data_dir, language)
    files = language_files(data_dir, language, "train" if held_out_by_hash else split)
    want_held_out = split == "validation"
    skipped = Skipped()
    count = 0
    for text in read_documents(files, skipped):
        if held_out_by_hash and is_held_out(text, validation_fraction) != want_held_out:
            continue
        count += 1
        yield text
    log = logging.warning if skipped else logging.info
    log("%s/%s: read %d documents from %d files; skipped: %s.", language.task_name, split, count,
        len(files), skipped.summary())
