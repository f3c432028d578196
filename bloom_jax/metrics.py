"""Training figures and how they read: counts and durations, peak memory, the console line, the
time breakdown. Writing them is metric_logger.py's (TensorBoard, through clu and TensorFlow);
this module imports neither, so plan, bench and budget start without them.

Console lines know the trainer's keys and print them with units:

    step 12695/95000 | loss 2.3456 | lr 6.000e-05 | grad_norm 0.412 | batch 2048 | tokens 20.2B |
    105.22 s/step | 39.9k tokens/s | 111.8 TFLOP/s/device | MFU 35.8% | HFU 47.6% |
    skipped 0 | peak host 21.3 GiB | peak device 61.2 GiB

Any other key (e.g. `eval/loss/fr`) follows, in name order.
"""

from collections.abc import Callable, Iterator, Mapping
import contextlib
import resource
import time

import jax

# Known keys in display order, each with its console format.
CONSOLE_FIELDS: dict[str, Callable[[float], str]] = {
    "loss": lambda v: f"loss {v:.4f}",
    "learning_rate": lambda v: f"lr {v:.3e}",
    "grad_norm": lambda v: f"grad_norm {v:.3f}",
    "batch_size": lambda v: f"batch {v:.0f}",
    "tokens_seen": lambda v: f"tokens {human(v)}",
    "step_time_s": lambda v: f"{v:.2f} s/step",
    "tokens_per_s": lambda v: f"{human(v)} tokens/s",
    "tflops_per_device": lambda v: f"{v:.1f} TFLOP/s/device",
    "mfu": lambda v: f"MFU {100 * v:.1f}%",
    "hfu": lambda v: f"HFU {100 * v:.1f}%",
    "skipped_steps": lambda v: f"skipped {v:.0f}",
    "peak_host_rss_mb": lambda v: f"peak host {v / 1024:.1f} GiB",
    "peak_device_bytes": lambda v: f"peak device {v / 2**30:.1f} GiB",
    "goodput": lambda v: f"goodput {100 * v:.0f}%",
}


def human(value: float, scaled: str = ".1f", unscaled: str = ".0f") -> str:
    """A count with a k/M/B/T suffix: 1234 -> '1.2k', 20_200_000_000 -> '20.2B'; `scaled` and
    `unscaled` format the number with and without a suffix (".3g": three figures)."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:{scaled}}{suffix}"
    return f"{value:{unscaled}}"


def format_duration(seconds: float) -> str:
    """A duration as its two largest units: '2d 03h', '3h 04m', '4m 05s', '12s'."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def peak_host_rss_mb() -> float:
    """This process's peak resident memory so far, MiB: the kernel's high-water mark, so no
    short peak between two samples is missed."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux counts KiB


def peak_device_bytes() -> int | None:
    """The highest peak of bytes in use on this process's devices so far; None where the
    platform keeps no count (CPUs: there the state is host memory, in `peak_host_rss_mb`)."""
    peaks = [stats["peak_bytes_in_use"] for stats in
             (device.memory_stats() for device in jax.local_devices())
             if stats and "peak_bytes_in_use" in stats]
    return max(peaks) if peaks else None


def memory_scalars() -> dict[str, float]:
    """`peak_host_rss_mb`, and `peak_device_bytes` where the devices count it."""
    device = peak_device_bytes()
    return {"peak_host_rss_mb": peak_host_rss_mb(),
            **({} if device is None else {"peak_device_bytes": device})}


# The time shares (`time/compile`, ...) go to TensorBoard and the progress line, not every step's.
BREAKDOWN_PREFIX = "time/"


def format_line(step: int, scalars: Mapping[str, float], total_steps: int | None = None) -> str:
    """One console line: the step, then known keys in CONSOLE_FIELDS order, then the rest."""
    head = f"step {step}/{total_steps}" if total_steps else f"step {step}"
    known = [fmt(float(scalars[key])) for key, fmt in CONSOLE_FIELDS.items() if key in scalars]
    others = [f"{key} {float(value):.4g}" for key, value in sorted(scalars.items())
              if key not in CONSOLE_FIELDS and not key.startswith(BREAKDOWN_PREFIX)]
    return " | ".join([head, *known, *others])


class TimeBreakdown:
    """Where the run's wall time went: compile, waiting for data, step, checkpoint, eval, other.

    The loop wraps each part in `measure`; compiles are `add`ed as they are reported (they happen
    inside the step or the eval, and count as compile only). `scalars()` gives each part's share
    of the wall time since the start as `time/<part>`, and `goodput`, the step's share.
    """

    PARTS = ("compile", "data", "step", "checkpoint", "eval")

    def __init__(self):
        self._start = time.perf_counter()
        self._seconds = dict.fromkeys(self.PARTS, 0.0)

    def add(self, part: str, seconds: float) -> None:
        self._seconds[part] += seconds

    @contextlib.contextmanager
    def measure(self, part: str) -> Iterator[None]:
        start, compiled = time.perf_counter(), self._seconds["compile"]
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start - (self._seconds["compile"] - compiled)
            self.add(part, max(elapsed, 0.0))

    def scalars(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self._start, 1e-9)
        shares = {f"{BREAKDOWN_PREFIX}{part}": seconds / wall
                  for part, seconds in self._seconds.items()}
        shares[f"{BREAKDOWN_PREFIX}other"] = max(1.0 - sum(shares.values()), 0.0)
        return {**shares, "goodput": shares[f"{BREAKDOWN_PREFIX}step"]}
