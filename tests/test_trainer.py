"""The training loop in this process on the tiny config: a run of skipped steps stops it, and
INIT_FROM starts it from a converted checkpoint. (The command's processes: test_train.py.)"""

import json

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bloom_jax import configs, param_store, sharded_step, trainer
from bloom_jax.data import instructions
from bloom_jax.model import BloomForCausalLM
from tests.test_metric_logger import read_scalars, read_tensors


def parse_tiny(model_dir, *bindings: str) -> None:
    configs.parse(["tiny.gin"], [f"MODEL_DIR = '{model_dir}'", *bindings])


def test_stacked_batches_are_the_next_batches_in_order():
    stream = iter([{"input_ids": np.full([2, 3], i, np.int32)} for i in range(5)])
    stacked = trainer.stacked_batches(stream, 3)
    assert stacked["input_ids"].shape == (3, 2, 3)  # [micro_batches, batch, length]
    np.testing.assert_array_equal(stacked["input_ids"][:, 0, 0], [0, 1, 2])
    assert next(stream)["input_ids"][0, 0] == 3


@pytest.mark.slow
def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    # Every loss after the first update exceeds 0.5 x its average: steps 2, 3, 4 are skipped,
    # and each is logged although log_every (10) skips them.
    parse_tiny(tmp_path, "TRAIN_STEPS = 8", "train.log_every = 10",
               "SkipPolicy.spike_factor = 0.5", "SkipPolicy.max_consecutive = 2")
    with pytest.raises(trainer.TrainingError, match="3 steps in a row were skipped .* step 4"):
        trainer.train()
    assert read_scalars(tmp_path)["skipped_steps"] == [(1, 0), (2, 1), (3, 2), (4, 3)]


@pytest.mark.slow
def test_an_infinite_learning_rate_never_saves_a_non_finite_parameter(tmp_path):
    # Its loss and gradient norm are finite: only the update it would apply is not.
    parse_tiny(tmp_path, "TRAIN_STEPS = 6", "learning_rate_schedule.peak_lr = 1e999",
               "CheckpointOptions.every_steps = 2", "SkipPolicy.max_consecutive = 4")
    with pytest.raises(trainer.TrainingError, match="5 steps in a row were skipped .* step 5. "
                                                    "Skipped updates are never applied"):
        trainer.train()
    scalars = read_scalars(tmp_path)
    assert [value for _, value in scalars["skipped_steps"]] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(value) for _, value in scalars["loss"] + scalars["grad_norm"])
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.all_steps() == [1, 2, 4]
        for step in manager.all_steps():
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore()))
            for leaf in jax.tree.leaves([restored["params"], restored["opt_state"]]):
                assert np.isfinite(leaf).all(), step


@pytest.mark.slow
def test_init_from_starts_from_the_converted_parameters(tmp_path):
    parse_tiny(tmp_path / "run", "TRAIN_STEPS = 1", f"INIT_FROM = '{tmp_path / 'converted'}'")
    config = sharded_step.Workload().model_config
    params = BloomForCausalLM(config).init(jax.random.PRNGKey(7), np.zeros([1, 1], np.int32))
    converted = jax.tree.map(np.asarray, nn.unbox(params["params"]))
    param_store.save_params(tmp_path / "converted", config, converted)

    state = trainer.train()
    # The first step's learning rate is 0 (warmup starts there): the parameters stay the converted
    # ones, in the state and in the step-1 checkpoint.
    _, saved = param_store.load_params(tmp_path / "run" / "checkpoints", config)
    for got in (state.params, saved):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), converted)


@pytest.mark.slow
def test_profile_trace_time_breakdown_and_operative_config(tmp_path):
    parse_tiny(tmp_path, "TRAIN_STEPS = 3", "train.log_every = 1", "train.profile_steps = (2, 1)")
    trainer.train()
    assert list((tmp_path / "plugins" / "profile").glob("*/*.xplane.pb"))  # TensorBoard's
    assert list((tmp_path / "plugins" / "profile").glob("*/*.trace.json.gz"))  # Perfetto's
    scalars = read_scalars(tmp_path)
    parts = ("compile", "data", "step", "checkpoint", "eval", "other")
    for step in (1, 2, 3):
        shares = {part: dict(scalars[f"time/{part}"])[step] for part in parts}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6), shares
        assert dict(scalars["goodput"])[step] == shares["step"]
    assert dict(scalars["time/compile"])[1] > 0  # the step compiled before step 1 ran
    (step, text), = read_tensors(tmp_path)["gin/operative_config"]
    assert step == 0 and b"train.profile_steps = (2, 1)" in text.item()


@pytest.mark.slow
def test_the_step_compiles_once_across_the_batch_ramp(tmp_path):
    compiled = []
    def record(event, duration, **kwargs):
        if event == trainer._CompileLog.EVENT and kwargs.get("fun_name") == "jit(step)":
            compiled.append(duration)
    # Batches of 4, 4, 8, 12, 16 sequences: 1, 1, 2, 3, 4 micro-steps of 4.
    parse_tiny(tmp_path, "TRAIN_STEPS = 5", "train.log_every = 1", "MICRO_BATCH_SIZE = 4",
               "BatchRampUp.start = 4", "BatchRampUp.increment = 4",
               "BatchRampUp.rampup_samples = 24")
    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        trainer.train()
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert [size for _, size in read_scalars(tmp_path)["batch_size"]] == [4, 4, 8, 12, 16]
    assert len(compiled) == 1


@pytest.mark.slow
def test_a_run_on_a_token_store_trains_as_one_on_the_raw_corpus(tmp_path):
    """The raw corpus is tokenized into MODEL_DIR/tokens; a run given that store as TOKENS_DIR
    reads the same batches, so it logs the same losses."""
    parse_tiny(tmp_path / "raw", "TRAIN_STEPS = 2", "train.log_every = 1")
    trainer.train()
    store = tmp_path / "raw" / "tokens"
    assert (store / "manifest.json").is_file()
    gin.clear_config()
    parse_tiny(tmp_path / "stored", "TRAIN_STEPS = 2", "train.log_every = 1",
               f"TOKENS_DIR = '{store}'")
    trainer.train()
    assert not (tmp_path / "stored" / "tokens").exists()
    losses = [read_scalars(tmp_path / run)["loss"] for run in ("raw", "stored")]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_profile_steps_are_start_and_count():
    with pytest.raises(ValueError, match="is not START,COUNT"):
        trainer.Profile(None, (0, 3))


def instruction_file(path, count, seed):
    """Synthetic instructions: a prompt of four colour words, answered with the matching
    animals in reverse order (prompt and answer words never share a token)."""
    rng = np.random.default_rng(seed)
    colours = "red green blue yellow purple orange black white".split()
    animals = dict(zip(colours, "cat dog fox owl bee cow pig rat".split()))
    lines = []
    for _ in range(count):
        words = rng.choice(colours, 4, replace=False)
        lines.append(json.dumps({"inputs": "colours: " + " ".join(words) + " ->",
                                 "targets": " " + " ".join(animals[w] for w in words[::-1])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def mean_losses(params, config, streams):
    """{part: mean token loss} of held-out batches scored on their targets and prompts."""
    model = BloomForCausalLM(config)
    means = {}
    for part, batches in streams.items():
        loss_sum = weight_sum = 0.0
        for batch in batches:
            logits = model.apply({"params": params}, batch["input_ids"],
                                 segment_ids=batch["segment_ids"], positions=batch["positions"])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            loss_sum += float((losses * batch["loss_weights"]).sum())
            weight_sum += float(batch["loss_weights"].sum())
        means[part] = loss_sum / weight_sum
    return means


@pytest.mark.slow
def test_instruction_tuning_learns_the_targets_not_the_prompts(tmp_path):
    """The trainer's held-out evaluation (SFT_EVAL_DATA): the targets' loss falls, the prompts'
    does not (nothing trains on them), and the logged figures are the model's own losses."""
    data, held_out = (instruction_file(tmp_path / f"{n}.jsonl", 200, seed)
                      for n, seed in (("train", 0), ("held_out", 1)))
    configs.parse(["tiny.gin", "sft.gin"], [
        f"MODEL_DIR = '{tmp_path / 'run'}'", f"SFT_DATA = '{data}'", "TRAIN_STEPS = 60",
        "BATCH_SIZE = 8", "SEQUENCE_LENGTH = 64", f"INIT_FROM = '{tmp_path / 'init'}'",
        f"SFT_EVAL_DATA = '{held_out}'", "train.eval_every = 30",
        "learning_rate_schedule.peak_lr = 3e-3", "learning_rate_schedule.min_lr = 3e-3"])
    config = sharded_step.Workload().model_config
    init = nn.unbox(BloomForCausalLM(config).init(jax.random.PRNGKey(0),
                                                  np.zeros([1, 1], np.int32))["params"])
    param_store.save_params(tmp_path / "init", config, jax.tree.map(np.asarray, init))
    state = trainer.train()

    streams = instructions.instruction_validation_streams(
        data=held_out, sequence_length=64, batch_size=8, process_index=0, process_count=1)
    before, after = mean_losses(init, config, streams), mean_losses(state.params, config, streams)
    scalars = read_scalars(tmp_path / "run")
    for part in ("targets", "prompts"):
        logged = dict(scalars[f"eval/loss/{part}"])
        assert list(logged) == [30, 60]
        assert logged[60] == pytest.approx(after[part], abs=1e-4)
    assert after["targets"] < 0.3 * before["targets"], (before, after)
    # Nothing teaches the prompts: their loss does not fall.
    assert after["prompts"] > before["prompts"] - 0.1, (before, after)
