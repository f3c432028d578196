"""Helpers for the data tests: tiny corpora written to disk, the optional shared ROOTS sample."""

import json
import pathlib

import seqio

SHARED_ROOTS_SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "../shared/data/roots_sample"


def write_jsonl(path: pathlib.Path, texts) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    return path


def seqio_documents(task: seqio.Task, split: str) -> list[list[int]]:
    """The task's documents as seqio's own preprocessors tokenize them (through tf.data)."""
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                               trim_output_features=False)
    return [example["targets"].tolist() for example in dataset.as_numpy_iterator()]


def mixture(tasks: dict[str, seqio.Task], rates: dict[str, float]) -> seqio.Mixture:
    """An unregistered seqio Mixture of `tasks` with `rates` (task name -> rate)."""
    return seqio.Mixture("test_mixture", [(tasks[name], rate) for name, rate in rates.items()])
