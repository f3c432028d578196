"""`python -m bloom_jax.train` run as a user runs it, in its own processes, on the tiny config:
killed and restarted, preempted, on 8 simulated devices, and given bad input.

Every run reads and fills the suite's persistent compilation cache (conftest.py), so only the
first run of each mesh compiles, and is forked from a process that imported the libraries once
(tests/forked_commands.py).
"""

import configparser
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import (COMPILATION_CACHE_VARIABLES, SUITE_XLA_FLAGS, build_once,
                            environ_without, xla_flags)
from tests import forked_commands
from tests.forked_commands import run_commands, run_commands_once
from tests.test_metric_logger import read_scalars

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_STEPS = 8  # the reference run: 2N steps, checkpointed at 1 (orbax's first save), 4 and 8
EVERY = 4
TIMEOUT_S = 300
MESH_2_2_2 = ("--gin.create_mesh.data=2", "--gin.create_mesh.fsdp=2", "--gin.create_mesh.tensor=2")


def _flags(model_dir: pathlib.Path, train_steps: int, bindings: tuple[str, ...]) -> list[str]:
    return ["--gin_file=gin_configs/tiny.gin", f"--gin.MODEL_DIR={model_dir}",
            f"--gin.TRAIN_STEPS={train_steps}", "--gin.train.log_every=1",
            f"--gin.CheckpointOptions.every_steps={EVERY}", *bindings]


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices=devices)}


def train(model_dir: pathlib.Path, *bindings: str,
          train_steps: int = TRAIN_STEPS, devices: int = 1) -> subprocess.CompletedProcess:
    """Runs the command to its end; stdout and stderr (the console log) are returned as text."""
    return forked_commands.run(["train", *_flags(model_dir, train_steps, bindings)],
                               env=_env(devices), timeout=TIMEOUT_S)


def start_train(model_dir: pathlib.Path, log: pathlib.Path, *bindings: str,
                train_steps: int) -> forked_commands.Command:
    """Starts the command in the background, its console log going to `log`."""
    return forked_commands.start(["train", *_flags(model_dir, train_steps, bindings)], log,
                                 env=_env(devices=1))


def wait_for(condition, proc: forked_commands.Command, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def checkpoint_steps(model_dir: pathlib.Path) -> list[int]:
    """The committed checkpoint steps (orbax writes each under a temporary name, then renames)."""
    return sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())


def console_losses(text: str) -> dict[int, float]:
    """{step: loss} from the console lines `step 3/8 | loss 6.9380 | ...`."""
    return {int(step): float(loss)
            for step, loss in re.findall(r"step (\d+)/\d+ \| loss ([\d.]+)", text)}


def event_losses(path: pathlib.Path) -> dict[int, np.float32]:
    """{step: loss} as written to the TensorBoard event file(s) at `path`."""
    return {step: np.float32(loss) for step, loss in read_scalars(path)["loss"]}


def new_event_file(model_dir: pathlib.Path, before: set[pathlib.Path]) -> pathlib.Path:
    (path,) = set(model_dir.glob("events.out.tfevents.*")) - before
    return path


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def reference(shared_tmp) -> pathlib.Path:
    """MODEL_DIR of an uninterrupted run of TRAIN_STEPS steps on one device (one for all
    workers)."""
    return build_once(shared_tmp, "train_reference", lambda model_dir: ok(train(model_dir)))


@pytest.fixture(scope="module")
def help_and_no_gin_file(shared_tmp) -> tuple[subprocess.CompletedProcess, ...]:
    """The command with --help, and with no flag at all (forked from one process)."""
    return tuple(run_commands_once(shared_tmp, "train_help", ["train", "--help"], ["train"]))


def test_help_names_the_flags_and_the_macros(help_and_no_gin_file):
    result, _ = help_and_no_gin_file
    assert result.returncode == 0, result.stderr
    for words in ("--gin_file", "--gin_bindings", "--gin.NAME=VALUE", "--[no]verbose", "MODEL_DIR",
                  "DATA_DIR", "TRAIN_STEPS", "resumes"):
        assert words in result.stdout


def test_run_writes_its_gin_config_and_metrics(reference):
    config = (reference / "config.gin").read_text()
    assert f"TRAIN_STEPS = {TRAIN_STEPS}" in config
    assert f"MODEL_DIR = '{reference}'" in config
    assert "BloomConfig.hidden_size = 64" in config
    scalars = read_scalars(reference)
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "hfu", "batch_size",
                "tokens_seen", "skipped_steps"):
        assert [step for step, _ in scalars[tag]] == list(range(1, TRAIN_STEPS + 1)), tag
    loss = dict(scalars["loss"])
    assert loss[TRAIN_STEPS] < loss[1]
    assert dict(scalars["batch_size"])[1] == 16  # tiny.gin's BATCH_SIZE
    assert all(v > 0 for _, v in scalars["tokens_per_s"] + scalars["mfu"])
    assert checkpoint_steps(reference) == [1, EVERY, TRAIN_STEPS]


def killed_at_checkpoint(model_dir: pathlib.Path, log: pathlib.Path,
                         *bindings: str) -> forked_commands.Command:
    """A run that would go on for long, SIGKILLed once its step-EVERY checkpoint is committed."""
    proc = start_train(model_dir, log, *bindings, train_steps=1000)
    try:
        wait_for(lambda: (model_dir / "checkpoints" / str(EVERY)).is_dir(), proc,
                 f"checkpoint {EVERY}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc


@pytest.mark.slow
def test_restart_after_sigkill_logs_the_same_losses(reference, tmp_path):
    model_dir, log = tmp_path / "run", tmp_path / "killed.log"
    proc = killed_at_checkpoint(model_dir, log)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_steps(model_dir) == [1, EVERY], "killed too late to test the restart"
    killed_losses = console_losses(log.read_text())

    before = set(model_dir.glob("events.out.tfevents.*"))
    restarted = ok(train(model_dir))
    assert f"Resumed from step {EVERY}" in restarted.stderr

    expected = event_losses(reference)
    # Metrics are fetched one step late, so step EVERY's line may follow its (committed) save.
    assert killed_losses.keys() >= set(range(1, EVERY))
    assert killed_losses == pytest.approx({s: expected[s] for s in killed_losses}, abs=1e-4)
    resumed = event_losses(new_event_file(model_dir, before))
    assert resumed == {s: expected[s] for s in range(EVERY + 1, TRAIN_STEPS + 1)}  # bit-equal


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_the_relaunch_resumes(reference, tmp_path):
    model_dir, log = tmp_path / "run", tmp_path / "preempted.log"
    proc = start_train(model_dir, log, "--gin.CheckpointOptions.every_steps=1000",
                       train_steps=1000)
    try:
        wait_for(lambda: "step 2/1000 |" in log.read_text(), proc, "step 2")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()
    finally:
        proc.kill()
    console = log.read_text()
    preempted_at = max(console_losses(console))
    assert f"Preempted: checkpoint of step {preempted_at} saved; exiting." in console
    assert checkpoint_steps(model_dir) == [1, preempted_at]
    assert preempted_at < TRAIN_STEPS, "the run stopped too late to test the relaunch"

    before = set(model_dir.glob("events.out.tfevents.*"))
    relaunched = ok(train(model_dir))
    assert f"Resumed from step {preempted_at}" in relaunched.stderr
    expected = event_losses(reference)
    assert event_losses(new_event_file(model_dir, before)) == {
        s: expected[s] for s in range(preempted_at + 1, TRAIN_STEPS + 1)}


@pytest.mark.slow
def test_by_default_a_relaunch_reads_the_step_its_run_compiled_from_model_dir(tmp_path):
    """Without JAX_COMPILATION_CACHE_DIR (which the suite sets) the cache is MODEL_DIR's. The
    run compiles with XLA's default flags, as a user's does (not the suite's)."""
    env = {**environ_without(*COMPILATION_CACHE_VARIABLES), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": " ".join(flag for flag in os.environ["XLA_FLAGS"].split()
                                 if flag not in SUITE_XLA_FLAGS)}
    runs = [forked_commands.run(["train", *_flags(tmp_path, steps, ())], env=env)
            for steps in (1, 2)]
    assert "Compiled jit(step)" in ok(runs[0]).stderr, runs[0].stderr[-3000:]
    assert "Resumed from step 1" in ok(runs[1]).stderr
    assert "Loaded jit(step) from the compilation cache" in runs[1].stderr
    assert "Compiled jit(step)" not in runs[1].stderr
    assert any((tmp_path / "compilation_cache").iterdir())


@pytest.mark.slow
def test_pipelined_run_on_8_devices_logs_its_bubble_and_the_losses_of_one_device(
        reference, tmp_path):
    pipelined = ok(train(tmp_path, "--gin.create_mesh.stage=2",
                         "--gin.create_mesh.data=2", "--gin.create_mesh.fsdp=2", devices=8))
    assert "Mesh {'stage': 2, 'data': 2, 'fsdp': 2, 'tensor': 1}" in pipelined.stderr
    # The reference's batches: one micro-step of all 16 sequences, (2 - 1) / (1 + 2 - 1) idle
    assert ("Pipeline: 2 stages x 1 layers in 1 round(s), passes of 1 micro-steps: bubble 50.0%;"
            in pipelined.stderr)
    expected, got = read_scalars(reference), read_scalars(tmp_path)
    for tag in ("loss", "grad_norm"):
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in expected[tag]],
                                   rtol=1e-5, err_msg=tag)


@pytest.mark.slow
def test_checkpoint_of_one_device_resumes_on_mesh_2_2_2(reference, tmp_path):
    # MODEL_DIR holding the reference run's step-EVERY checkpoint only.
    for name in ("config.json", str(EVERY)):
        source, target = reference / "checkpoints" / name, tmp_path / "checkpoints" / name
        target.parent.mkdir(exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    resumed = ok(train(tmp_path, *MESH_2_2_2, devices=8))
    assert "Mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in resumed.stderr
    assert f"Resumed from step {EVERY}" in resumed.stderr
    expected, got = read_scalars(reference), read_scalars(tmp_path)
    for tag in ("loss", "grad_norm", "learning_rate"):
        assert [step for step, _ in got[tag]] == list(range(EVERY + 1, TRAIN_STEPS + 1))
        np.testing.assert_allclose([v for _, v in got[tag]],
                                   [v for step, v in expected[tag] if step > EVERY],
                                   rtol=1e-5, err_msg=tag)


def _file_digests(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# One case per kind of check; tests/test_configs.py checks each macro, unknown names and files.
BAD_INPUTS = [
    ("--gin.DATA_DIR=/nonexistent/roots", "Corpus folder /nonexistent/roots does not exist"),
    ("--gin.train.trainsteps=3", "Configurable 'train' doesn't have a parameter named "
                                 "'trainsteps'"),
    ("--gin.BloomConfig.n_layer=3", "saved for another model (n_layer: checkpoint 2 vs asked 3); "
                                    "train with the gin config it was saved with"),
    ("--gin.TRAIN_STEPS='abc'", "TRAIN_STEPS = 'abc' is not a positive integer; set it to one"),
    ("--gin.VOCABULARY={tmp}/garbage.model", "Vocabulary file {tmp}/garbage.model is not a "
                                             "readable SentencePiece model"),
    ("--gin.DATA_DIR={tmp}/garbage.model", "Corpus folder {tmp}/garbage.model is a file, not a "
                                           "folder"),
    ("--gin.SEED=7", "Saved data state has seed=42 but this stream has 7"),  # once restored
]


@pytest.fixture(scope="module")
def bad_input_runs(reference, shared_tmp) -> list[dict]:
    """Per BAD_INPUTS case, in its folder `tmp` (a copy of the reference run as `tmp`/run, a
    garbage `tmp`/garbage.model): the command's exit status and stderr, and the run's file
    digests before and after. Then a new MODEL_DIR with INIT_FROM missing, and a misspelled
    binding with --verbose. The commands fork from one process that imported their libraries
    (they end before any training step: their time would be those imports), once for all
    workers."""
    def run_all(folder: pathlib.Path) -> None:
        cases = [folder / str(i) for i in range(len(BAD_INPUTS))]
        for case in cases:
            shutil.copytree(reference, case / "run")
            (case / "garbage.model").write_bytes(np.random.default_rng(0).bytes(2000))
        digests = [_file_digests(case / "run") for case in cases]
        argvs = [["train", *_flags(case / "run", TRAIN_STEPS, (binding.format(tmp=case),))]
                 for case, (binding, _) in zip(cases, BAD_INPUTS)]
        argvs += [["train", *_flags(folder / "new", TRAIN_STEPS,
                                    (f"--gin.INIT_FROM={folder}/nothing",))],
                  ["train", *_flags(folder / "verbose", TRAIN_STEPS,
                                    ("--gin.trian.seed=3", "--verbose"))]]
        results = run_commands(*argvs, env=_env(1))
        runs = [{"tmp": str(folder / str(i)), "returncode": r.returncode, "stderr": r.stderr}
                for i, r in enumerate(results)]
        for run, case, before in zip(runs, cases, digests):
            run.update(before=before, after=_file_digests(case / "run"))
        (folder / "runs.json").write_text(json.dumps(runs))

    return json.loads((build_once(shared_tmp, "train_bad_inputs", run_all) / "runs.json")
                      .read_text())


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)),
                         ids=[binding for binding, _ in BAD_INPUTS])
def test_bad_input_ends_with_one_line_and_leaves_model_dir_intact(bad_input_runs, case):
    run = bad_input_runs[case]
    message = BAD_INPUTS[case][1].format(tmp=run["tmp"])
    assert run["returncode"] == 1
    assert "Traceback" not in run["stderr"]
    last_line = run["stderr"].rstrip("\n").splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, run["stderr"]
    assert run["after"] == run["before"]


def test_bad_input_leaves_a_new_model_dir_unwritten(bad_input_runs):
    run = bad_input_runs[len(BAD_INPUTS)]
    assert run["returncode"] == 1
    assert run["stderr"].rstrip("\n").splitlines()[-1].startswith(
        f"error: {pathlib.Path(run['tmp']).parent}/nothing/config.json not found")
    assert not (pathlib.Path(run["tmp"]).parent / "new").exists()


def test_verbose_shows_the_traceback(bad_input_runs):
    run = bad_input_runs[len(BAD_INPUTS) + 1]
    assert run["returncode"] == 1
    assert "Traceback" in run["stderr"] and "No configurable matching 'trian'" in run["stderr"]


def test_no_gin_file_names_the_fix(help_and_no_gin_file):
    _, result = help_and_no_gin_file
    assert result.returncode == 2  # a usage error
    assert "No --gin_file given" in result.stderr and "--gin_file=gin_configs/tiny.gin" in (
        result.stderr)


def test_a_damaged_latest_checkpoint_is_refused_and_the_run_resumes_from_the_one_before(
        reference, tmp_path):
    model_dir = shutil.copytree(reference, tmp_path / "run")
    params = model_dir / "checkpoints" / str(TRAIN_STEPS) / "params"
    data_file = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:][:64])
    data_file.write_bytes(bytes(data))

    before = set(model_dir.glob("events.out.tfevents.*"))
    resumed = ok(train(model_dir))
    assert re.search(rf"error: checkpoint step {TRAIN_STEPS} in \S+ (fails verification: "
                     r"\['params'\]|cannot be read)", resumed.stderr), resumed.stderr
    assert f"Falling back to step {EVERY}, the newest checkpoint that verifies" in resumed.stderr
    expected = event_losses(reference)
    assert event_losses(new_event_file(model_dir, before)) == {
        s: expected[s] for s in range(EVERY + 1, TRAIN_STEPS + 1)}
    assert (model_dir / "checkpoints" / f"{TRAIN_STEPS}.corrupt").is_dir()  # kept aside


def test_a_failed_save_ends_the_run_at_once_naming_its_step(tmp_path):
    started = time.monotonic()
    result = forked_commands.run(["tests/faults/disk_full.py", *_flags(tmp_path, 1000, ())],
                                 env=_env(1), timeout=TIMEOUT_S)
    assert result.returncode == 1
    last_line = result.stderr.rstrip("\n").splitlines()[-1]
    assert last_line.startswith("error: saving the checkpoint of step 1 to "), result.stderr
    assert "No space left on device" in last_line
    assert max(console_losses(result.stderr), default=1) == 1  # stopped at the failed save's step
    assert time.monotonic() - started < TIMEOUT_S / 2
    assert checkpoint_steps(tmp_path) == []


def test_a_second_trainer_on_one_model_dir_is_refused(tmp_path):
    log = tmp_path / "first.log"
    first = start_train(tmp_path, log, train_steps=1000)
    try:
        wait_for(lambda: "step 1/1000 |" in log.read_text(), first, "step 1")
        first.send_signal(signal.SIGSTOP)  # alive and holding the directory, leaving the CPUs
        second = train(tmp_path, train_steps=1000)
    finally:
        first.kill()
        first.wait()
    last_line = second.stderr.rstrip("\n").splitlines()[-1]
    assert second.returncode == 1
    assert re.match(rf"error: {tmp_path}/checkpoints is in use by another trainer \(pid "
                    rf"{first.pid} ", last_line), second.stderr


@pytest.fixture(scope="module")
def lora_sft_bindings(tmp_path_factory) -> tuple[str, ...]:
    """sft.gin's instruction tuning with LoRA adapters, from a converted tiny checkpoint."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top

    from bloom_jax import param_store  # pylint: disable=g-import-not-at-top
    from bloom_jax.model import BloomConfig, BloomForCausalLM  # pylint: disable=g-import-not-at-top
    from tests.test_trainer import instruction_file  # pylint: disable=g-import-not-at-top

    directory = tmp_path_factory.mktemp("lora_sft")
    config = BloomConfig(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4, dtype="float32",
                         scan_layers=False)  # tiny.gin's
    init = nn.unbox(BloomForCausalLM(config).init(jax.random.PRNGKey(0),
                                                  np.zeros([1, 1], np.int32))["params"])
    param_store.save_params(directory / "init", config, jax.tree.map(np.asarray, init))
    return ("--gin_file=gin_configs/sft.gin", f"--gin.INIT_FROM={directory / 'init'}",
            f"--gin.SFT_DATA={instruction_file(directory / 'sft.jsonl', 200, 0)}",
            "--gin.BATCH_SIZE=8", "--gin.SEQUENCE_LENGTH=64", "--gin.Workload.lora=@LoraConfig()",
            "--gin.LoraConfig.rank=4", "--gin.learning_rate_schedule.peak_lr=3e-3",
            "--gin.learning_rate_schedule.min_lr=3e-3")


@pytest.mark.slow
def test_lora_instruction_tuning_resumes_exactly_after_sigkill_and_keeps_its_adapters(
        lora_sft_bindings, tmp_path):
    """The adapters, their Adam state and the instruction stream's position come back from the
    step-EVERY checkpoint: the resumed steps' losses are the uninterrupted run's, bit for bit.
    (A relaunch that asks for other adapters is refused: tests/test_lora.py.)"""
    reference = ok(train(tmp_path / "reference", *lora_sft_bindings))
    assert "LoRA: " in reference.stderr
    model_dir, log = tmp_path / "run", tmp_path / "killed.log"
    killed_at_checkpoint(model_dir, log, *lora_sft_bindings)
    assert checkpoint_steps(model_dir) == [1, EVERY], "killed too late to test the restart"

    before = set(model_dir.glob("events.out.tfevents.*"))
    restarted = ok(train(model_dir, *lora_sft_bindings))
    assert f"Resumed from step {EVERY}" in restarted.stderr
    expected = event_losses(tmp_path / "reference")
    assert event_losses(new_event_file(model_dir, before)) == {
        s: expected[s] for s in range(EVERY + 1, TRAIN_STEPS + 1)}


# The Colab cells' model at the tiny config's dimensions, so that CI runs the same command lines.
TINY_DIMENSIONS = ("--gin.BloomConfig.n_layer=2", "--gin.BloomConfig.hidden_size=64",
                   "--gin.BloomConfig.n_head=4", "--gin.BloomConfig.vocab_size=1024",
                   "--gin.BloomConfig.dtype='float32'", "--gin.TRAIN_STEPS=2",
                   "--gin.SEQUENCE_LENGTH=32", "--gin.train.log_every=1",
                   "--gin.BloomConfig.loss_vocab_chunks=8")  # (the config's 56 slices of 1024)


def readme_colab_cells() -> list[str]:
    """The lines of the README's "On Colab" code block."""
    section = (REPO / "README.md").read_text().split("### On Colab\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0].splitlines()


@pytest.mark.slow
def test_the_readme_colab_cells_run_on_cpu_with_the_tiny_dimensions(tmp_path):
    """The README's cells as written (`/content` moved to a temporary directory), the training
    command with the tiny model's dimensions appended; the install cell names an extra that
    setup.cfg defines (the suite's environment is installed already)."""
    cells = [line.replace("/content", str(tmp_path)) for line in readme_colab_cells()]
    install = next(line for line in cells if line.startswith("!pip install -e "))
    extra = re.fullmatch(r'!pip install -e "\.\[(\w+)\]"', install).group(1)
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert extra in setup["options.extras_require"]

    commands = [shlex.split(line[1:]) for line in cells if line.startswith("!python ")]
    assert [command[2] for command in commands] == [
        "bloom_jax.train", "bloom_jax.generate", "bloom_jax.convert"]
    assert "--gin_file=gin_configs/bloom560m_colab.gin" in commands[0]
    commands[0] += TINY_DIMENSIONS
    # Each `python -m bloom_jax.X ...` forked from one process that imported their libraries.
    runs = [ok(run) for run in run_commands(
        *[[command[2].removeprefix("bloom_jax."), *command[3:]] for command in commands],
        env=_env(1))]

    logdir = next(line.split("--logdir ")[1] for line in cells if line.startswith("%tensorboard"))
    scalars = read_scalars(logdir)
    assert [step for step, _ in scalars["loss"]] == [1, 2]
    assert all(rss > 0 for _, rss in scalars["peak_host_rss_mb"])
    assert checkpoint_steps(pathlib.Path(logdir)) == [2]  # the end only
    assert not (pathlib.Path(logdir) / "checkpoints" / "2" / "opt_state").exists()  # params only
    assert runs[1].stdout.startswith("Les modèles de langue")
    hf_dir = tmp_path / "bloom560m_hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in hf_dir.iterdir()}
