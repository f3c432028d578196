"""The planner: the real train step compiled on abstract arrays, measured per device."""

import dataclasses
import json
import os
import re
import subprocess

import jax
import numpy as np
import pytest

from bloom_jax import flops, layouts, lora as lora_lib, optim, plan, scaling, sharded_step
from bloom_jax.collectives import Collective
from tests import forked_commands
from tests.conftest import xla_flags
from tests.test_runs import write_run
from partitioning.mesh import create_mesh
from partitioning.rules import logical_axis_rules

TINY = sharded_step.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8)
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
    result = layouts.plan_step(workload, create_mesh(devices=jax.devices()[:1]),
                               logical_axis_rules())
    params = flops.param_count(TINY)
    assert result.param_bytes == result.grad_bytes == 4 * params
    assert 2 * 4 * params <= result.optimizer_bytes < 2 * 4 * params + 1024  # mu, nu, scalars
    assert (result.micro_batch, result.micro_batches) == (4, 4)
    assert result.peak_bytes > result.param_bytes + result.optimizer_bytes + result.temp_bytes / 2
    assert ("word_embeddings/embedding", (256, 64), jax.sharding.PartitionSpec("tensor", "fsdp")
            ) in result.shardings


def test_on_one_device_the_step_is_its_hardware_flops_at_the_hfu():
    """No collectives: a step that recomputes every layer takes its hardware FLOPs at --hfu;
    dots_with_no_batch_dims, which recomputes only attention's matmuls, is faster by them."""
    config = sharded_step.BloomConfig(hidden_size=2048, n_layer=24, n_head=16)  # bloom-1b7
    workload = sharded_step.Workload(config, sequence_length=2048,
                                     batch_ramp=optim.BatchRampUp(global_batch_size=16, start=16))
    peak, hfu = flops.PEAK_FLOPS["A100"]["bfloat16"], 0.48
    step_s = {policy: layouts.evaluate(
        workload, layouts.Layout({"data": 1, "fsdp": 1, "tensor": 1}, 8, False, policy, False),
        "A100", hfu, layouts.LINKS["A100"], 8, compile_it=False).analytic.step_s
        for policy in ("full", "dots_with_no_batch_dims")}
    for policy, seconds in step_s.items():
        assert seconds == pytest.approx(flops.flops_per_step(config, 16, 2048, policy)
                                        / (peak * hfu))
    assert sorted(step_s, key=step_s.get) == ["dots_with_no_batch_dims", "full"]


def test_overlap_model_hides_weight_traffic_behind_compute_but_not_activation_traffic():
    def collective(axes, link, wire):
        return Collective("all-reduce", 0, wire, 2, axes, link, 2, "x")
    found = [collective(("fsdp",), "network", 1e9), collective(("data",), "nvlink", 100e9),
             collective(("tensor",), "nvlink", 50e9),
             Collective("collective-permute", 0, 0.5e9, 2, ("stage",), "network", 2, "x")]
    links = (100e9, 1e9)  # NVLink, network bytes/s
    short = layouts.predict(found, compute=1.0, links=links)
    assert (short.overlapped_s, short.exposed_s) == (2 + 2, 1 + 1)  # the next stage waits
    assert short.step_s == 4 + 2  # the overlapped traffic outlasts compute
    long = layouts.predict(found, compute=10.0, links=links)
    assert long.step_s == 10 + 2
    assert long.comm_bytes == {"nvlink": 300e9, "network": 3e9}


@pytest.mark.parametrize("repeats", [1, 2])
def test_a_pipelined_step_computes_the_padded_layers_through_the_bubble(repeats):
    """3 layers on 2 stages run 4 (one a pass-through), in 1 round of 2 layers or 2 of 1; 16
    sequences in micro-steps of 2 per rank, passes of 4: each pass takes 4 R + 2 - 1
    iterations."""
    config = sharded_step.BloomConfig(hidden_size=2048, n_layer=3, n_head=16,
                                      remat_policy="full")
    workload = sharded_step.Workload(config, sequence_length=2048,
                                     batch_ramp=optim.BatchRampUp(global_batch_size=16, start=16))
    layout = layouts.Layout({"stage": 2, "data": 1, "fsdp": 1, "tensor": 1}, 2, False, "full",
                            False, pipeline_micro_steps=4, pipeline_repeats=repeats)
    assert layout.micro_steps(16) == (8, 4)
    found = layouts.evaluate(workload, layout, "A100", 0.5, layouts.LINKS["A100"], 8,
                             compile_it=False).analytic
    padded = dataclasses.replace(config, n_layer=4)
    # "full" recomputes each layer's forward once
    hardware = flops.flops_per_step(padded, 16, 2048, "full")
    assert hardware == pytest.approx(flops.flops_per_step(padded, 16, 2048) + 16 * 2048 * 4
                                     * (24 * 2048**2 + 4 * 2048 * 2048))
    iterations = 4 * repeats + 2 - 1
    assert found.compute_s == pytest.approx(
        hardware / (2 * flops.PEAK_FLOPS["A100"]["bfloat16"] * 0.5) * iterations / (4 * repeats))
    permutes = [c for c in layouts.analytic_collectives(padded, layout, 16, 2048, 8)
                if c.kind == "collective-permute"]  # 2 passes, each iteration both ways
    assert [(c.axes, c.count, c.wire_bytes) for c in permutes] == [
        (("stage",), 2 * 2 * iterations, 2 * 2048 * 2048 * 4)]


def test_sequence_parallelism_shrinks_the_checkpoints_by_the_tensor_size():
    config = sharded_step.BloomConfig(hidden_size=14336, n_layer=70, n_head=112,
                                      dtype="bfloat16", remat_policy="full")
    full = layouts.checkpoint_bytes_per_sequence(config, 2048, 8, False)
    assert full == 70 * 2048 * 14336 * 2
    assert layouts.checkpoint_bytes_per_sequence(config, 2048, 8, True) == full // 8
    selective = dataclasses.replace(config, remat_policy="selective")  # 2 residuals, qkv, MLP
    assert layouts.checkpoint_bytes_per_sequence(selective, 2048, 8, True) == (
        70 * 2048 * (2 + 3 + 4) * 14336 // 8 * 2)
    offloaded = dataclasses.replace(config, remat_policy="layer_inputs_offloaded")
    assert layouts.checkpoint_bytes_per_sequence(offloaded, 2048, 8, True) == 0


def test_search_space_covers_micro_batches_up_to_the_rank_batch_sp_and_gathering():
    workload = sharded_step.Workload(TINY, sequence_length=32,
                                     batch_ramp=optim.BatchRampUp(global_batch_size=16, start=16))
    space = list(layouts.search_space(workload, 8, devices_per_node=4))
    meshes = {(stage, 8 // (stage * fsdp * tensor), fsdp, tensor) for stage in (1, 2)
              for fsdp in (1, 2, 4, 8) for tensor in (1, 2, 4)
              if 8 % (stage * fsdp * tensor) == 0}  # 2 layers: at most 2 stages
    assert {tuple(layout.mesh.values()) for layout in space} == meshes
    passes = {layout.pipeline_micro_steps for layout in space
              if layout.mesh == {"stage": 2, "data": 4, "fsdp": 1, "tensor": 1}
              and layout.micro_batch_size == 1}
    assert passes == {None, 2}  # 4 micro-steps: in one pass, or two of 2 (the stages)
    per_rank = {layout.micro_batch_size for layout in space
                if layout.mesh == {"stage": 1, "data": 2, "fsdp": 1, "tensor": 4}}
    assert per_rank == {1, 2, 3, 4, 8}  # 8 sequences per rank: 8, 4, 3, 2 or 1 micro-steps
    assert all(layout.mesh["tensor"] > 1 for layout in space if layout.sequence_parallel)
    assert all(layout.mesh["fsdp"] > 1 for layout in space if layout.gather_weights_once)
    assert {layout.remat for layout in space} == set(layouts.SEARCH_REMAT_POLICIES)


def test_lora_plan_holds_the_frozen_base_and_state_for_the_adapters_only():
    lora = lora_lib.LoraConfig(rank=4, target_modules=tuple(lora_lib.MODULES))
    workload = sharded_step.Workload(TINY, sequence_length=32, lora=lora,
                                     batch_ramp=optim.BatchRampUp(global_batch_size=16, start=16))
    result = layouts.plan_step(workload, create_mesh(devices=jax.devices()[:1]),
                               logical_axis_rules())
    # per layer: A and B of qkv (64x4 + 4x192), dense (64x4 + 4x64), and the MLP's two
    adapters = TINY.n_layer * 4 * (64 + 192 + 64 + 64 + 64 + 256 + 256 + 64)
    assert result.grad_bytes == 4 * adapters
    assert 2 * 4 * adapters <= result.optimizer_bytes < 2 * 4 * adapters + 1024
    assert result.param_bytes == 4 * (flops.param_count(TINY) + adapters)


def run_plan(tmp_path, *args):
    config = tmp_path / "tiny.gin"
    config.write_text(TINY_GIN)
    return forked_commands.run(["plan", f"--gin_file={config}", *args])


@pytest.mark.slow
def test_cli_plans_a_sharded_mesh_and_exits_3_when_it_does_not_fit(tmp_path):
    result = run_plan(tmp_path, "--num_devices=8", "--gin.create_mesh.fsdp=4",
                      "--gin.create_mesh.tensor=2", "--memory_gib=0.0001")
    out = result.stdout
    assert f"parameters: {flops.param_count(TINY)}\n" in out
    assert "mesh: data=1, fsdp=4, tensor=2 (8 devices)" in out
    assert "h/mlp/dense_h_to_4h/kernel: (2, 64, 256) -> P('stage', 'fsdp', 'tensor')" in out
    param_gib = float(re.search(r"parameters:\s+([\d.]+) GiB", out).group(1))
    assert param_gib == pytest.approx(4 * flops.param_count(TINY) / 8 / 2**30, abs=0.01)
    peak = int(re.search(r"per_device_peak_bytes: (\d+)", out).group(1))
    assert peak > 4 * 3 * flops.param_count(TINY) / 8  # at least parameters and Adam moments
    assert result.returncode == plan.EXIT_DOES_NOT_FIT, result.stderr
    assert re.search(r"does not fit: .* GiB per device > 0.0001 GiB; largest consumer: ",
                     result.stderr)


@pytest.mark.slow
def test_cli_plans_a_pipelined_mesh_with_its_bubble(tmp_path):
    result = run_plan(tmp_path, "--num_devices=8", "--gin.create_mesh.stage=2",
                      "--gin.create_mesh.fsdp=2", "--gin.create_mesh.tensor=2",
                      "--gin.MICRO_BATCH_SIZE=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh: stage=2, data=1, fsdp=2, tensor=2 (8 devices)" in result.stdout
    # 16 sequences in micro-steps of 2 x fsdp 2: (2 - 1) / (4 + 2 - 1); each device sends its
    # 2 rows of 32 x 64 bfloat16 activations
    assert ("pipeline: 2 stages of 1 layers (0 of them pass-throughs) in 1 round(s), passes of "
            "4 micro-steps, bubble 20.0% (in the predicted compute); 8.19kB per device to the "
            "next stage per iteration") in result.stdout
    assert "h/mlp/dense_h_to_4h/kernel: (2, 64, 256) -> P('stage', 'fsdp', 'tensor')" in (
        result.stdout)


@pytest.mark.slow
def test_cli_json_is_one_object_with_the_planner_keys(tmp_path):
    result = run_plan(tmp_path, "--num_devices=8", "--gin.create_mesh.fsdp=4",
                      "--gin.create_mesh.tensor=2", "--gin.logical_axis_rules.sequence_parallel"
                      "=True", "--gin.MICRO_BATCH_SIZE=2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert list(found) == ["mesh", "micro_batch", "micro_steps", "stages", "repeats", "sp",
                           "remat", "compute_s", "comm_bytes", "predicted_step_s",
                           "predicted_tflops_per_device", "per_device_peak_bytes"]
    assert found["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert (found["micro_batch"], found["micro_steps"], found["stages"], found["sp"]) == (
        2, 2, 1, True)
    assert found["comm_bytes"]["nvlink"] > 0 and found["comm_bytes"]["network"] == 0
    assert found["predicted_step_s"] >= found["compute_s"] > 0


@pytest.mark.slow
def test_cli_search_lists_layouts_fastest_first(tmp_path):
    # Bounded by count, not by time, so a loaded machine compiles the same three layouts.
    result = run_plan(tmp_path, "--num_devices=4", "--search", "--search_compiles=3",
                      "--search_seconds=900", "--network_gbps=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(re.findall(r"^  compiled ", result.stderr, re.M)) == 3, result.stderr[-3000:]
    steps = [float(s) for s in re.findall(r"^ +(\S+) s/step", result.stdout, re.M)]
    assert len(steps) == 3 and steps == sorted(steps) and steps[0] < steps[-1], result.stdout
    assert "3 compiled layouts fit 80 GiB" in result.stdout


@pytest.mark.slow
def test_cli_refuses_a_mesh_that_does_not_divide_the_heads(tmp_path):
    result = run_plan(tmp_path, "--num_devices=6", "--gin.create_mesh.tensor=3")
    assert result.returncode == plan.EXIT_BAD_MESH
    assert "'heads' / 'activation_heads' (size 8" in result.stderr
    assert "compiled" not in result.stdout


def plan_command(*args, command: str = "plan", devices: int | None = None,
                 ) -> subprocess.CompletedProcess:
    """`python -m bloom_jax.<command> ARGS` as a user runs it (forked: tests/forked_commands.py)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices:
        env["XLA_FLAGS"] = xla_flags(devices=devices)
    return forked_commands.run([command, *args], env=env)


@pytest.mark.slow
def test_cli_budget_writes_a_config_that_trains_and_plans(tmp_path):
    gin_file, model_dir = tmp_path / "planned.gin", tmp_path / "run"
    result = plan_command("--budget_flops=1e17", "--num_devices=1", f"--write_gin={gin_file}")
    assert result.returncode == 0, result.stderr
    chosen = re.search(r"chosen: (\d+) layers, hidden (\d+), (\d+) heads: ([\d,]+) parameters",
                       result.stdout)
    layers, hidden, heads, params = (int(g.replace(",", "")) for g in chosen.groups())
    assert params == flops.param_count(sharded_step.BloomConfig(
        n_layer=layers, hidden_size=hidden, n_head=heads))
    assert f"BloomConfig.hidden_size = {hidden}\n" in gin_file.read_text()

    # Trained for 2 steps at a CPU-sized batch (the planned one is 256 x 2048 tokens).
    result = plan_command(f"--gin_file={gin_file}", f"--gin.MODEL_DIR={model_dir}",
                          "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2", "--gin.BatchRampUp.start=2",
                          "--gin.SEQUENCE_LENGTH=32", "--gin.train.eval_every=0", command="train",
                          devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2 | loss" in result.stderr
    assert (model_dir / "checkpoints" / "2").is_dir()

    result = plan_command(f"--gin_file={gin_file}", "--num_devices=1")
    assert result.returncode == 0, result.stderr
    assert f"parameters: {params}\n" in result.stdout and "fits: " in result.stdout


@pytest.mark.slow
def test_cli_fit_recovers_the_law_of_synthetic_runs(tmp_path):
    truth, rng = scaling.BESIROGLU2024, np.random.default_rng(0)
    run_dirs = []
    for n_layer, hidden, n_head in ((2, 128, 2), (6, 512, 8), (12, 1024, 16), (24, 2048, 16)):
        config = sharded_step.BloomConfig(n_layer=n_layer, hidden_size=hidden, n_head=n_head)
        for tokens in (1e9, 1e10, 1e11):
            loss = truth.loss(flops.param_count(config), tokens) * np.exp(rng.normal(0, 0.003))
            run_dirs.append(tmp_path / f"{hidden}_{tokens:.0e}")
            write_run(run_dirs[-1], config, tokens_per_step=tokens / 10, eval_losses={10: loss})
    result = plan_command("--fit", "--bootstrap=10", "--budget_flops=5.76e23", *map(str, run_dirs))
    assert result.returncode == 0, result.stderr
    assert "12 runs (final eval/loss/all):" in result.stdout
    fitted = {name: float(re.search(rf"  {name} *= ([\d.e+]+)", result.stdout).group(1))
              for name in ("E", "alpha", "beta")}
    assert fitted["E"] == pytest.approx(truth.E, abs=0.03)
    assert fitted["alpha"] == pytest.approx(truth.alpha, abs=0.02)
    assert fitted["beta"] == pytest.approx(truth.beta, abs=0.02)
    assert re.search(r"at 5.76e\+23 FLOPs: 7\d.\dB parameters", result.stdout), result.stdout


def test_cli_budget_reports_an_unknown_gpu_in_one_line():
    result = plan_command("--budget=1000", "--gpu=v100")
    assert result.returncode == 1
    assert "error: unknown GPU 'v100'; use one of a100-40gb, a100-80gb" in result.stderr
