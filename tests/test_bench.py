"""The benchmark: its JSON figures follow flops.py's formula, the torch comparison runs, sweeps
list configurations that do not fit. Speeds themselves are never asserted (shared CPUs)."""

import json

import jax
import numpy as np
import pytest

from bloom_jax import bench, configs, flops, sharded_step
from tests import forked_commands

# The tiny config at a test-sized workload.
TINY = ["gin_configs/tiny.gin"]
SMALL_BATCH = ["BATCH_SIZE = 4", "BatchRampUp.start = 4", "SEQUENCE_LENGTH = 32"]


def tiny_model_config():
    """The tiny config's BloomConfig as gin builds it."""
    configs.parse(TINY, skip_unknown=configs.OUTSIDE_THE_STEP)
    return sharded_step.Workload().model_config


def test_synthetic_batches_are_packed_like_the_data_stream():
    batch = bench.synthetic_batch(np.random.default_rng(0), micro_batches=2, micro_batch=3,
                                  length=64, vocab_size=100)
    assert set(batch) == {"input_ids", "targets", "segment_ids", "positions", "loss_weights"}
    assert all(v.shape == (2, 3, 64) for v in batch.values())
    rows = {k: v.reshape(6, 64) for k, v in batch.items()}
    np.testing.assert_array_equal(rows["input_ids"][:, 1:], rows["targets"][:, :-1])
    # A new document starts at each </s>; positions restart there and count up inside it.
    starts = rows["input_ids"] == bench.SYNTHETIC_EOS_ID
    assert starts[:, 1:].any(), "rows should hold several documents"
    new_segment = np.diff(rows["segment_ids"], axis=1) == 1
    np.testing.assert_array_equal(new_segment, starts[:, 1:])
    np.testing.assert_array_equal(rows["positions"][:, 1:] == 0, starts[:, 1:])
    assert (rows["segment_ids"] >= 1).all() and (rows["loss_weights"] == 1).all()


@pytest.mark.slow
def test_cli_json_figures_follow_the_flops_formula_and_compare_with_torch():
    """Two steps of the tiny config with recomputation, and torch's step alternating with ours."""
    command = ["bench", *(f"--gin_file={f}" for f in TINY),
               "--gin.BATCH_SIZE=4", "--gin.BatchRampUp.start=4", "--gin.SEQUENCE_LENGTH=32",
               "--gin.BloomConfig.remat_policy=full", "--steps=2", "--warmup_steps=1",
               "--compare_torch", "--json"]
    done = forked_commands.run(command, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])

    step_time, devices, peak = figures["step_time_s"], figures["num_devices"], figures["peak_flops"]
    assert devices == jax.device_count() and peak > 0
    config = tiny_model_config()
    model_flops = flops.flops_per_step(config, 4, 32)
    hardware_flops = flops.flops_per_step(config, 4, 32, "full")
    assert figures["tokens_per_s"] == pytest.approx(4 * 32 / step_time)
    assert figures["mfu"] == pytest.approx(flops.mfu(model_flops, step_time, devices, peak))
    assert figures["hfu"] == pytest.approx(
        flops.mfu(hardware_flops, step_time, devices, peak))
    assert figures["tflops_per_device"] == pytest.approx(
        flops.tflops_per_device(model_flops, step_time, devices))
    assert figures["compile_s"] > 0
    adam_state_bytes = 3 * 4 * flops.param_count(config)  # float32 parameters, mu and nu
    assert adam_state_bytes <= figures["checkpoint_bytes"] < adam_state_bytes + 1000
    assert figures["digest_s"] > 0
    assert figures["peak_host_rss_mb"] > 0
    assert "peak_device_bytes" not in figures  # CPUs keep no count: their memory is the host's
    assert figures["torch_tokens_per_s"] == pytest.approx(4 * 32 / figures["torch_step_time_s"])
    assert figures["speedup_vs_torch"] == pytest.approx(
        figures["torch_step_time_s"] / step_time)


def test_lora_steps_on_a_base_and_reports_adam_state_as_twice_the_adapters():
    configs.parse(TINY, [*SMALL_BATCH, "Workload.lora = @LoraConfig()", "LoraConfig.rank = 4"],
                  skip_unknown=configs.OUTSIDE_THE_STEP)
    workload = sharded_step.Workload()
    result = bench.benchmark(steps=1, warmup_steps=0)
    # query_key_value's A [2 layers, 64, 4] and B [2 layers, 4, 3 x 64] in float32 (4 bytes).
    adapters = 2 * (64 * 4 + 4 * 3 * 64) * 4
    assert result.trained_param_bytes == adapters
    # Adam's mu and nu per adapter parameter, plus a few scalars (count, learning rate).
    assert 0 <= result.optimizer_state_bytes - 2 * adapters <= 64
    assert "optimizer state: 16.4kB, 2.00 x the 8.2kB of LoRA adapters" in bench.format_result(
        result, workload)


@pytest.mark.slow
def test_sweep_lists_every_combination_and_those_that_do_not_fit():
    # One device: fsdp=3 leaves no data-parallel size to infer, a MeshError before compiling.
    rows = bench.sweep(TINY, SMALL_BATCH, bench.parse_sweeps(["create_mesh.fsdp=1,3"]),
                       steps=1, warmup_steps=0)
    assert [row.bindings for row in rows] == [{"create_mesh.fsdp": "1"},
                                              {"create_mesh.fsdp": "3"}]
    assert rows[0].result.tokens_per_s > 0 and rows[0].does_not_fit is None
    assert rows[1].result is None and rows[1].does_not_fit.startswith("mesh: ")
    table = bench.format_sweep(rows).splitlines()
    assert table[0].split()[:2] == ["create_mesh.fsdp", "tokens/s"]
    assert table[1].split()[0] == "1"
    assert table[2].startswith("3") and "does not fit (mesh: " in table[2]


@pytest.mark.slow
def test_gpu_suite_fails_at_once_without_a_gpu():
    done = forked_commands.run(["bench", "--suite=gpu"])
    assert done.returncode == 1 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == done.stderr.strip().splitlines()[-1:] == [
        "error: --suite=gpu needs a GPU; jax sees cpu devices only. Run it on a GPU machine with "
        "jax's CUDA wheels (pip install 'jax[cuda12]'). (--verbose shows the traceback)"]


@pytest.mark.slow
def test_suite_times_each_model_with_each_attention():
    """The GPU suite's structure, on the tiny config with the attentions a CPU has."""
    suite = bench.run_suite({"tiny": "tiny.gin"}, SMALL_BATCH, ("xla", "einsum"), steps=1,
                            warmup_steps=0)
    figures = suite["models"]["tiny"]
    for implementation in ("xla", "einsum"):
        assert figures[implementation]["tokens_per_s"] > 0
        assert figures[implementation]["mfu"] > 0 and figures[implementation]["hfu"] > 0
        assert figures[implementation]["step_peak_bytes"] > 0
    assert figures["xla_speedup"] == pytest.approx(
        figures["xla"]["tokens_per_s"] / figures["einsum"]["tokens_per_s"])
    assert suite["device"] == jax.devices()[0].device_kind and suite["wall_s"] > 0
    json.dumps(suite)


@pytest.mark.slow
def test_generate_times_our_decoding_and_hugging_faces_on_the_same_weights():
    configs.parse(TINY, skip_unknown=configs.OUTSIDE_THE_STEP)
    result = bench.benchmark_generate(steps=1, warmup_steps=0, compare_torch=True, batch=2,
                                      prompt_length=4, new_tokens=3)
    assert result.same_tokens_as_torch
    assert result.tokens_per_s == pytest.approx(2 * 3 / result.time_s)
    assert result.speedup_vs_torch == pytest.approx(result.torch_time_s / result.time_s)


def test_sweep_table_is_sorted_by_tokens_per_second():
    def row(mbs, tokens_per_s):
        result = bench.Result(compile_s=1.0, step_time_s=1.0, tokens_per_s=tokens_per_s,
                              num_devices=1, peak_flops=1e12, model_flops_per_step=1e9,
                              tflops_per_device=0.001, mfu=0.001,
                              hardware_flops_per_step=1e9, hfu=0.001, step_peak_bytes=0,
                              peak_host_rss_mb=1.0)
        return bench.SweepRow({"MICRO_BATCH_SIZE": mbs}, result=result)
    rows = [row("1", 10.0), bench.SweepRow({"MICRO_BATCH_SIZE": "8"}, does_not_fit="x"),
            row("2", 30.0)]
    ordered = bench.sort_rows(rows)
    assert [r.bindings["MICRO_BATCH_SIZE"] for r in ordered] == ["2", "1", "8"]


def test_only_mesh_and_memory_errors_count_as_not_fitting():
    from partitioning.mesh import MeshError
    assert bench.does_not_fit(MeshError("fsdp=3 does not divide")).startswith("mesh: ")
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 GiB")
    assert bench.does_not_fit(oom).startswith("memory: ")
    assert bench.does_not_fit(ValueError("a bug")) is None


@pytest.mark.parametrize("sweep", ["MICRO_BATCH_SIZE", "=1,2", "create_mesh.fsdp="])
def test_malformed_sweeps_name_the_expected_form(sweep):
    with pytest.raises(ValueError, match="is not NAME=v1,v2"):
        bench.parse_sweeps([sweep])


def test_sweep_values_split_at_commas():
    assert bench.parse_sweeps(["a.b=1, 2", "BloomConfig.remat_policy=none,full"]) == {
        "a.b": ["1", "2"], "BloomConfig.remat_policy": ["none", "full"]}
