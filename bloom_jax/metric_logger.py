"""The run's metrics writer: scalars and texts to TensorBoard event files through clu, each step's
console line, and progress with ETA.

Only the primary process (process 0) writes; the others hold a logger that does nothing, so the
loop calls it unconditionally. The lines' formats are metrics.py's.
"""

from collections.abc import Mapping
import os
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax

from bloom_jax import metrics


class Progress(periodic_actions.PeriodicAction):
    """Logs `progress step/total (pct) | rate | ETA` every `every_secs`, with smoothed steps/s.

    The rate is an exponential moving average over report intervals, so one slow step (a
    checkpoint save, an eval) does not swing the ETA of a months-long run.
    """

    def __init__(self, total_steps: int, *, every_secs: float = 60.0, smoothing: float = 0.7,
                 writer: metric_writers.MetricWriter | None = None):
        super().__init__(every_secs=every_secs, on_steps=[total_steps])
        self._total_steps = total_steps
        self._smoothing = smoothing
        self._writer = writer
        self._steps_per_s: float | None = None
        self.last_line: str | None = None
        self.suffix = ""  # appended to the line, e.g. the time breakdown

    def _should_trigger(self, step: int, t: float) -> bool:
        # The first call only starts the clock, even at the last step (a resumed run's last).
        return step != self._previous_step and super()._should_trigger(step, t)

    def _apply(self, step: int, t: float):
        rate = (step - self._previous_step) / (t - self._previous_time)
        if self._steps_per_s is not None:
            rate = self._smoothing * self._steps_per_s + (1 - self._smoothing) * rate
        self._steps_per_s = rate
        speed = f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step"
        eta = metrics.format_duration((self._total_steps - step) / rate)
        self.last_line = (f"progress {step}/{self._total_steps} "
                          f"({100 * step / self._total_steps:.1f}%) | {speed} | ETA {eta}"
                          + (f" | {self.suffix}" if self.suffix else ""))
        logging.info(self.last_line)
        if self._writer is not None:
            self._writer.write_scalars(step, {"steps_per_sec": rate})


class MetricsLogger:
    """Scalars to TensorBoard event files in `logdir` and to the console, from process 0 only.

    Use as a context manager (or call `close`) so that buffered events reach the disk.
    """

    def __init__(self, logdir: str | os.PathLike, *, total_steps: int | None = None,
                 is_primary: bool | None = None, progress_every_secs: float = 60.0,
                 asynchronous: bool = True):
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._total_steps = total_steps
        self._writer = None
        self._progress = None
        if self.is_primary:
            writer = metric_writers.SummaryWriter(os.fspath(logdir))
            self._writer = metric_writers.AsyncWriter(writer) if asynchronous else writer
            if total_steps:
                self._progress = Progress(total_steps, every_secs=progress_every_secs,
                                                writer=self._writer)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> str | None:
        """Writes the scalars (Python, numpy or replicated jax values) and logs their line."""
        if not self.is_primary:
            return None
        scalars = {key: float(value) for key, value in jax.device_get(dict(scalars)).items()}
        self._writer.write_scalars(step, scalars)
        line = metrics.format_line(step, scalars, self._total_steps)
        logging.info(line)
        return line

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Writes `text` to TensorBoard's text tab under `tag` (e.g. the operative gin config)."""
        if self.is_primary:
            self._writer.write_texts(step, {tag: text})

    def progress(self, step: int, t: float | None = None, suffix: str = "") -> str | None:
        """Call after every step; returns the progress line (ending in `suffix`) when one was
        due (else None)."""
        if self._progress is None:
            return None
        self._progress.suffix = suffix
        if not self._progress(step, t):
            return None
        return self._progress.last_line

    def flush(self) -> None:
        if self.is_primary:
            self._writer.flush()

    def close(self) -> None:
        if self.is_primary:
            self._writer.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
