"""Finished training runs as scaling-law data: parameters, tokens and final eval loss of a
MODEL_DIR, read from what the trainer wrote there.

The parameter count comes from MODEL_DIR/checkpoints/config.json (the model config), the loss
from the last logged `eval/loss/<task>` scalar of the TensorBoard events in MODEL_DIR, and the
tokens from `tokens_seen` logged at or before that step.
"""

from __future__ import annotations

import dataclasses
import pathlib

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from bloom_jax import flops, param_store

TOKENS_TAG = "tokens_seen"


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished run: where it is, and the (N, D, L) point it gives a fit."""

    model_dir: str
    params: int
    tokens: float
    loss: float
    step: int


def _scalars(model_dir: pathlib.Path, tag: str, reader: event_accumulator.EventAccumulator
             ) -> list[tuple[int, float]]:
    if tag not in reader.Tags()["tensors"]:
        raise ValueError(f"{model_dir} has no logged {tag!r} (tags: "
                         f"{', '.join(sorted(reader.Tags()['tensors'])) or 'none'}); a run "
                         "logs eval losses when trained with train.eval_every > 0.")
    return [(event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in reader.Tensors(tag)]


def read_run(model_dir: str | pathlib.Path, task: str = "all") -> Run:
    """The run in `model_dir`: its parameter count, and its last `eval/loss/<task>` with the
    tokens seen by then."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory (give a run's MODEL_DIR).")
    params = flops.param_count(param_store.load_config(model_dir / "checkpoints"))
    reader = event_accumulator.EventAccumulator(str(model_dir), size_guidance={"tensors": 0})
    reader.Reload()
    step, loss = _scalars(model_dir, f"eval/loss/{task}", reader)[-1]
    tokens = [value for at, value in _scalars(model_dir, TOKENS_TAG, reader) if at <= step]
    if not tokens:
        raise ValueError(f"{model_dir} logged no {TOKENS_TAG!r} at or before step {step}.")
    return Run(str(model_dir), params, tokens[-1], loss, step)
