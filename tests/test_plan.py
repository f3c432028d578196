"""The planner: the real train step compiled on abstract arrays, measured per device."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from bloom_jax import flops, optim, plan, sharded_step
from partitioning.mesh import create_mesh
from partitioning.rules import logical_axis_rules

ROOT = pathlib.Path(__file__).parents[1]
TINY = plan.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8)
TINY_GIN = """
include 'base.gin'
BloomConfig.vocab_size = 256
BloomConfig.hidden_size = 64
BloomConfig.n_layer = 2
BloomConfig.n_head = 8
BATCH_SIZE = 16
SEQUENCE_LENGTH = 32
"""


def test_one_device_plan_counts_the_float32_state_it_holds():
    workload = sharded_step.Workload(TINY, sequence_length=32, micro_batch_size=4,
                                     batch_ramp=optim.BatchRampUp(global_batch_size=16, start=16))
    result = plan.plan_step(workload, create_mesh(devices=jax.devices()[:1]),
                            logical_axis_rules())
    params = flops.param_count(TINY)
    assert result.param_bytes == result.grad_bytes == 4 * params
    assert 2 * 4 * params <= result.optimizer_bytes < 2 * 4 * params + 1024  # mu, nu, scalars
    assert (result.micro_batch, result.micro_batches) == (4, 4)
    assert result.peak_bytes > result.param_bytes + result.optimizer_bytes + result.temp_bytes / 2
    assert ("word_embeddings/embedding", (256, 64), jax.sharding.PartitionSpec("tensor", "fsdp")
            ) in result.shardings


def run_plan(tmp_path, *args):
    config = tmp_path / "tiny.gin"
    config.write_text(TINY_GIN)
    return subprocess.run(
        [sys.executable, "-m", "bloom_jax.plan", f"--gin_file={config}", *args],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=300)


@pytest.mark.slow
def test_cli_plans_a_sharded_mesh_and_exits_3_when_it_does_not_fit(tmp_path):
    result = run_plan(tmp_path, "--num_devices=8", "--gin.create_mesh.fsdp=4",
                      "--gin.create_mesh.tensor=2", "--memory_gib=0.0001")
    out = result.stdout
    assert f"parameters: {flops.param_count(TINY)}\n" in out
    assert "mesh: data=1, fsdp=4, tensor=2 (8 devices)" in out
    assert "h/mlp/dense_h_to_4h/kernel: (2, 64, 256) -> P(None, 'fsdp', 'tensor')" in out
    param_gib = float(re.search(r"parameters:\s+([\d.]+) GiB", out).group(1))
    assert param_gib == pytest.approx(4 * flops.param_count(TINY) / 8 / 2**30, abs=0.01)
    peak = int(re.search(r"per_device_peak_bytes: (\d+)", out).group(1))
    assert peak > 4 * 3 * flops.param_count(TINY) / 8  # at least parameters and Adam moments
    assert result.returncode == plan.EXIT_DOES_NOT_FIT, result.stderr
    assert re.search(r"does not fit: .* GiB per device > 0.0001 GiB; largest consumer: ",
                     result.stderr)


@pytest.mark.slow
def test_cli_refuses_a_mesh_that_does_not_divide_the_heads(tmp_path):
    result = run_plan(tmp_path, "--num_devices=6", "--gin.create_mesh.tensor=3")
    assert result.returncode == plan.EXIT_BAD_MESH
    assert "'heads' / 'activation_heads' (size 8" in result.stderr
    assert "compiled" not in result.stdout
