"""Metrics' formats: console lines with units, durations; the peak host memory a process reports."""

import json
import os
import subprocess
import sys

import pytest

from bloom_jax import metrics


def test_console_line_has_every_training_figure_with_units():
    line = metrics.format_line(12695, {
        "skipped_steps": 0, "mfu": 0.3582, "hfu": 0.4758, "tflops_per_device": 111.8,
        "tokens_per_s": 39_859.0,
        "step_time_s": 105.22, "tokens_seen": 20.2e9, "batch_size": 2048, "grad_norm": 0.4123,
        "learning_rate": 6e-5, "loss": 2.34567, "eval/loss/en": 2.1, "goodput": 0.93,
        "time/step": 0.93, "time/compile": 0.07,  # on the progress line, not this one
        "peak_host_rss_mb": 21_800.0, "peak_device_bytes": 61.2 * 2**30,
    }, total_steps=95000)
    assert line == ("step 12695/95000 | loss 2.3457 | lr 6.000e-05 | grad_norm 0.412 | batch 2048 | "
                    "tokens 20.2B | 105.22 s/step | 39.9k tokens/s | 111.8 TFLOP/s/device | "
                    "MFU 35.8% | HFU 47.6% | skipped 0 | peak host 21.3 GiB | "
                    "peak device 61.2 GiB | goodput 93% | eval/loss/en 2.1")
    assert metrics.format_line(3, {"loss": 1.0}) == "step 3 | loss 1.0000"


@pytest.mark.parametrize("seconds, text", [
    (12, "12s"), (245, "4m 05s"), (3 * 3600 + 4 * 60 + 9, "3h 04m"), (2 * 86400 + 3 * 3600, "2d 03h"),
])
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_peak_host_rss_keeps_a_short_lived_allocation():
    """In a fresh process (this one's peak may be anything): 512 MiB touched and freed at once
    still shows in the peak, and CPUs report no device peak (their memory is the host's)."""
    script = """
import json, os, numpy as np
from bloom_jax import metrics
pages = int(open("/proc/self/statm").read().split()[1])  # resident now, below the imports' peak
resident_mb = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
block = np.ones(512 * 2**20 // 8); del block
print(json.dumps([resident_mb, metrics.memory_scalars()]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resident_mb, after = json.loads(done.stdout.splitlines()[-1])
    assert after["peak_host_rss_mb"] - resident_mb > 500
    assert "peak_device_bytes" not in after
