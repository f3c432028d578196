"""Reading corpus files: layouts, splits, and bad input skipped and counted."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloom_jax.data import documents
from bloom_jax.data import languages
from tests.data.helpers import write_jsonl


def test_bad_input_is_skipped_and_counted(tmp_path):
    path = tmp_path / "en.jsonl"
    path.write_bytes(b'{"text": "good one"}\n'
                     b'{"text": "broken\n'
                     b'{"title": "no text"}\n'
                     b'{"text": 42}\n'
                     b'[1, 2]\n'
                     b'{"text": "bad \xff\xfe utf-8"}\n'
                     b'\n'
                     b'{"text": ""}\n'
                     b'{"text": "good two"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    skipped = documents.Skipped()
    texts = list(documents.read_documents([path, tmp_path / "empty.jsonl"], skipped))
    assert texts == ["good one", "good two"]
    assert skipped == {"malformed JSON lines": 1, "records without a text string": 3,
                       "lines of invalid UTF-8": 1, "empty documents": 1, "empty files": 1}
    assert "1 malformed JSON lines" in skipped.summary()


def test_parquet_text_column(tmp_path):
    path = tmp_path / "fr.parquet"
    pq.write_table(pa.table({"text": ["un", None, "deux"], "id": [1, 2, 3]}), path)
    skipped = documents.Skipped()
    assert list(documents.read_documents([path], skipped)) == ["un", "deux"]
    assert skipped == {"records without a text string": 1}


def test_parquet_binary_text_column(tmp_path):
    path = tmp_path / "fr.parquet"
    pq.write_table(pa.table({"text": pa.array([b"un", b"\xff\xfe", b"deux"], pa.binary())}), path)
    skipped = documents.Skipped()
    assert list(documents.read_documents([path], skipped)) == ["un", "deux"]
    assert skipped == {"records of invalid UTF-8": 1}


def test_parquet_without_text_column_names_the_file(tmp_path):
    path = tmp_path / "fr.parquet"
    pq.write_table(pa.table({"content": ["un"]}), path)
    with pytest.raises(ValueError, match=f"{path}.*no 'text' column"):
        list(documents.read_documents([path], documents.Skipped()))


def test_layouts_and_validation_folder(tmp_path):
    en = languages.lookup("en")
    python = languages.lookup("code/python")
    write_jsonl(tmp_path / "en.jsonl", ["a"])
    write_jsonl(tmp_path / "en" / "more.jsonl", ["b"])
    write_jsonl(tmp_path / "en" / "validation" / "v.jsonl", ["c"])
    (tmp_path / "code" / "python").mkdir(parents=True)
    (tmp_path / "code" / "python" / "x.py").write_text("print(1)\n")
    (tmp_path / "code" / "python" / "notes.txt").write_text("not code\n")
    assert documents.language_files(tmp_path, en, "train") == [
        tmp_path / "en" / "more.jsonl", tmp_path / "en.jsonl"]
    assert documents.language_files(tmp_path, en, "validation") == [
        tmp_path / "en" / "validation" / "v.jsonl"]
    assert documents.language_files(tmp_path, python, "train") == [
        tmp_path / "code" / "python" / "x.py"]
    assert documents.language_files(tmp_path, languages.lookup("fr"), "train") == []


def test_held_out_fraction_is_stable_and_close():
    texts = [f"document {i}" for i in range(20_000)]
    held = sum(documents.is_held_out(t, 0.05) for t in texts)
    assert abs(held / len(texts) - 0.05) < 0.006  # binomial sd 0.0015 at n = 20,000
    assert [documents.is_held_out(t, 0.05) for t in texts[:50]] == [
        documents.is_held_out(t, 0.05) for t in texts[:50]]
