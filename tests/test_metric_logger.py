"""The metrics writer: event files TensorBoard reads back, console lines, progress with ETA,
primary-only writes."""

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from bloom_jax import metric_logger


def read_tensors(logdir) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every tensor (scalars, texts) in the event files under `logdir`, as TensorBoard's own
    reader sees them."""
    reader = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    reader.Reload()
    return {tag: [(event.step, tensor_util.make_ndarray(event.tensor_proto))
                  for event in reader.Tensors(tag)]
            for tag in reader.Tags()["tensors"]}


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every numeric scalar in the event files under `logdir`."""
    return {tag: [(step, float(value)) for step, value in events]
            for tag, events in read_tensors(logdir).items() if events[0][1].dtype != object}


@pytest.mark.parametrize("asynchronous", [True, False])
def test_scalars_reach_tensorboard_event_files(tmp_path, asynchronous):
    with metric_logger.MetricsLogger(tmp_path, total_steps=10, is_primary=True,
                               asynchronous=asynchronous) as logger:
        logger.write_scalars(1, {"loss": jnp.float32(5.25), "learning_rate": 1e-4})
        logger.write_scalars(2, {"loss": np.float32(4.5), "learning_rate": 2e-4, "eval/loss/fr": 3.0})
    scalars = read_scalars(tmp_path)
    assert scalars["loss"] == [(1, 5.25), (2, 4.5)]
    assert scalars["learning_rate"] == [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]
    assert scalars["eval/loss/fr"] == [(2, 3.0)]


def test_only_the_primary_process_writes(tmp_path):
    with metric_logger.MetricsLogger(tmp_path / "run", total_steps=10, is_primary=False) as logger:
        assert logger.write_scalars(1, {"loss": 1.0}) is None
        assert logger.progress(1, t=0.0) is None
    assert not (tmp_path / "run").exists()


def test_write_scalars_returns_the_console_line(tmp_path):
    with metric_logger.MetricsLogger(tmp_path, total_steps=100, is_primary=True) as logger:
        assert logger.write_scalars(7, {"loss": 3.0, "batch_size": 8}) == \
            "step 7/100 | loss 3.0000 | batch 8"


def test_progress_line_with_smoothed_rate_and_eta(tmp_path):
    with metric_logger.MetricsLogger(tmp_path, total_steps=100, is_primary=True, progress_every_secs=1.0,
                               asynchronous=False) as logger:
        assert logger.progress(0, t=0.0) is None  # the first call only starts the clock
        assert logger.progress(5, t=0.5) is None  # under every_secs
        # 10 steps in 5 s: 2 steps/s, 90 steps left.
        assert logger.progress(10, t=5.0) == "progress 10/100 (10.0%) | 2.00 steps/s | ETA 45s"
        # Next interval runs at 0.1 steps/s; smoothed 0.7 * 2 + 0.3 * 0.1 = 1.43 steps/s.
        assert logger.progress(11, t=15.0) == "progress 11/100 (11.0%) | 1.43 steps/s | ETA 1m 02s"
        # The last step always reports, however soon.
        assert logger.progress(100, t=15.1).startswith("progress 100/100 (100.0%)")
    assert [step for step, _ in read_scalars(tmp_path)["steps_per_sec"]] == [10, 11, 100]


def test_a_first_call_at_the_last_step_only_starts_the_clock(tmp_path):
    # A run resumed one step before its end calls progress once, at the last step.
    with metric_logger.MetricsLogger(tmp_path, total_steps=100, is_primary=True,
                               asynchronous=False) as logger:
        assert logger.progress(100, t=7.0) is None


def test_slow_steps_are_shown_as_seconds_per_step(tmp_path):
    with metric_logger.MetricsLogger(tmp_path, total_steps=95000, is_primary=True,
                               progress_every_secs=60.0) as logger:
        logger.progress(0, t=0.0)
        # BLOOM's ~105 s/iteration: 94,999 steps left -> ~115 days.
        assert logger.progress(1, t=105.0) == "progress 1/95000 (0.0%) | 105.0 s/step | ETA 115d 10h"
