"""Helpers for the data tests: tiny corpora written to disk, the optional shared ROOTS sample."""

import json
import pathlib

SHARED_ROOTS_SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "../shared/data/roots_sample"


def write_jsonl(path: pathlib.Path, texts) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                  encoding="utf-8")
  return path
