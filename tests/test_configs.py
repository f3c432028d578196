"""gin configs: every file parses and takes the shared macros, each released size is the released
model to the parameter, and the `--gin.NAME=VALUE` shorthand; every command speaks the same
dialect (--help, one `error:` line for a bad flag)."""

import os
import pathlib
import re
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from bloom_jax import configs, flops, param_store, sharded_step
from bloom_jax import trainer  # noqa: F401  registers every configurable a training config binds
from bloom_jax.model import BloomConfig
from tests import forked_commands
from tests.forked_commands import run_commands_once

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ["train", "evaluate", "plan", "bench", "convert", "generate", "serve", "serve_bench",
            "data.inspect", "data.bench", "data.tokenizer"]

# The released models' parameter counts (model cards of bigscience/bloom-560m ... bloom on the
# Hugging Face Hub).
RELEASED_PARAMS = {
    "bloom560m": 559_214_592,
    "bloom1b1": 1_065_314_304,
    "bloom1b7": 1_722_408_960,
    "bloom3b": 3_002_557_440,
    "bloom7b1": 7_069_016_064,
    "bloom176b": 176_247_271_424,
}
GIN_FILES = sorted(configs.GIN_CONFIGS_DIR.glob("*.gin"))
# Files that follow a size file (`--gin_file=bloom560m.gin --gin_file=sft.gin`): tested after tiny.
OVERLAYS = ("sft",)
RUN_CONFIGS = [path.stem for path in GIN_FILES if path.stem != "base"]


def with_size(name: str) -> list[str]:
    """The gin files that run config `name` is parsed with."""
    return ["tiny.gin", f"{name}.gin"] if name in OVERLAYS else [f"{name}.gin"]


def model_config() -> BloomConfig:
    """The BloomConfig the parsed gin config builds."""
    return sharded_step.Workload().model_config


def test_every_released_size_has_a_config():
    assert RELEASED_PARAMS.keys() <= set(RUN_CONFIGS)


@pytest.mark.parametrize("size", RELEASED_PARAMS)
def test_released_size_has_the_released_parameter_count(size):
    configs.parse([f"{size}.gin"])
    config = model_config()
    shapes = param_store.abstract_params(config)  # jax.eval_shape: nothing is allocated
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert count == RELEASED_PARAMS[size]
    assert flops.param_count(config) == count  # the planner's closed form agrees


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: p.name)
def test_every_gin_file_parses(path):
    configs.parse(with_size(path.stem) if path.stem in OVERLAYS else [str(path)])
    assert gin.query_parameter("%SEQUENCE_LENGTH") > 0
    if path.stem != "base":  # base.gin leaves the model's size to the size files
        config = model_config()
        assert config.head_dim * config.n_head == config.hidden_size


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_config_takes_the_shared_macros(name):
    configs.parse(with_size(name), [
        "MODEL_DIR = '/runs/x'", "DATA_DIR = '/data/roots'", "TRAIN_STEPS = 7",
        "BATCH_SIZE = 48", "SEQUENCE_LENGTH = 64", "SEED = 5", "INIT_FROM = '/ckpt/hf'",
        "MICRO_BATCH_SIZE = 3", "DOCUMENT_MASKING = True",
        "BatchRampUp.start = 48"])  # 176B's ramp starts at 192
    train = gin.get_bindings("train")
    assert (train["model_dir"], train["train_steps"], train["seed"], train["init_from"]) == (
        "/runs/x", 7, 5, "/ckpt/hf")
    stream = gin.get_bindings("make_stream")
    assert (stream["data_dir"], stream["sequence_length"], stream["seed"]) == (
        "/data/roots", 64, 5)
    assert stream["document_masking"] and gin.get_bindings("validation_streams")["document_masking"]
    workload = sharded_step.Workload()
    assert (workload.batch_size, workload.sequence_length, workload.micro_batch_size) == (
        48, 64, 3)


@pytest.mark.parametrize("arg, binding", [
    ("--gin.MODEL_DIR=/tmp/run", "MODEL_DIR = '/tmp/run'"),
    ("--gin.DATA_DIR=gs://bucket/roots", "DATA_DIR = 'gs://bucket/roots'"),
    ("--gin.BloomConfig.dtype=bfloat16", "BloomConfig.dtype = 'bfloat16'"),
    ("--gin.MODEL_DIR='/tmp/quoted'", "MODEL_DIR = '/tmp/quoted'"),
    ("--gin.TRAIN_STEPS=10", "TRAIN_STEPS = 10"),
    ("--gin.learning_rate_schedule.peak_lr=6e-5", "learning_rate_schedule.peak_lr = 6e-5"),
    ("--gin.create_mesh.data=-1", "create_mesh.data = -1"),
    ("--gin.CheckpointOptions.keep_every=None", "CheckpointOptions.keep_every = None"),
    ("--gin.CheckpointOptions.async_save=False", "CheckpointOptions.async_save = False"),
    ("--gin.initialize.local_device_ids=[0, 1]", "initialize.local_device_ids = [0, 1]"),
    ("--gin.Workload.model_config=@BloomConfig()", "Workload.model_config = @BloomConfig()"),
    ("--gin.make_stream.seed=%SEED", "make_stream.seed = %SEED"),
    ("--gin.x=a=b", "x = 'a=b'"),
    ("--gin.train.profile_steps=10,5", "train.profile_steps = (10,5)"),
    ("--gin.train.profile_steps=(10, 5)", "train.profile_steps = (10, 5)"),
])
def test_gin_shorthand_quotes_bare_strings_only(arg, binding):
    assert configs.rewrite_gin_args([arg]) == [f"--gin_bindings={binding}"]


def test_other_arguments_pass_through():
    argv = ["train.py", "--gin_file=tiny.gin", "--gin_bindings=SEED = 1", "--verbose"]
    assert configs.rewrite_gin_args(argv) == argv


def test_shorthand_bindings_reach_the_config():
    argv = configs.rewrite_gin_args(["--gin.MODEL_DIR=/tmp/run 1", "--gin.TRAIN_STEPS=3",
                                     "--gin.BloomConfig.n_layer=5"])
    configs.parse(["tiny.gin"], [arg.removeprefix("--gin_bindings=") for arg in argv])
    train = gin.get_bindings("train")
    assert (train["model_dir"], train["train_steps"]) == ("/tmp/run 1", 3)
    assert model_config().n_layer == 5


def test_misspelled_binding_fails_at_parse_with_gins_message():
    with pytest.raises(ValueError, match="No configurable matching 'trian'"):
        configs.parse(["tiny.gin"], ["trian.train_steps = 3"])
    with pytest.raises(ValueError, match="doesn't have a parameter named 'train_step'"):
        configs.parse(["tiny.gin"], ["train.train_step = 3"])


def test_an_unknown_macro_fails_naming_the_closest_known_one():
    with pytest.raises(ValueError, match=r"Unknown macro TRAIN_STEPZ: no config file defines or "
                                         r"uses it. Did you mean TRAIN_STEPS\?"):
        configs.parse(["tiny.gin"], ["TRAIN_STEPZ = 12"])


def test_a_macro_of_an_overlay_file_is_known(tmp_path):
    configs.parse(with_size("sft"), ["SFT_DATA = '/data/xp3'"])
    own = tmp_path / "own.gin"  # a user's file that uses a macro of its own
    own.write_text("include 'tiny.gin'\nSTEPS_PER_LOG = 5\ntrain.log_every = %STEPS_PER_LOG\n")
    gin.clear_config()
    configs.parse([str(own)], ["STEPS_PER_LOG = 7"])
    assert gin.get_bindings("train")["log_every"] == 7


@pytest.mark.parametrize("binding, message", [
    ("TRAIN_STEPS = 'abc'", "TRAIN_STEPS = 'abc' is not a positive integer; set it to one, e.g. "
                            "--gin.TRAIN_STEPS=1000."),
    ("TRAIN_STEPS = 2.5", "TRAIN_STEPS = 2.5 is not a positive integer"),
    ("BATCH_SIZE = 0", "BATCH_SIZE = 0 is not a positive integer"),
    ("BATCH_SIZE = 'x'", "BATCH_SIZE = 'x' is not a positive integer"),
    ("SEQUENCE_LENGTH = 0", "SEQUENCE_LENGTH = 0 is not a positive integer"),
    ("MICRO_BATCH_SIZE = 0", "MICRO_BATCH_SIZE = 0 is not a positive integer"),
    ("SEED = 'a'", "SEED = 'a' is not an integer >= 0"),
    ("SEED = None", "SEED = None is not an integer >= 0"),
])
def test_integer_macros_are_checked_at_parse(binding, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        configs.parse(["tiny.gin"], [binding])


def test_integer_macros_take_their_allowed_values():
    configs.parse(["tiny.gin"], ["MICRO_BATCH_SIZE = None", "SEED = 0", "TRAIN_STEPS = 1"])


@pytest.mark.parametrize("name", ["gin_configs/nope.gin", "nope.gin", "/abs/nope.gin"])
def test_a_missing_gin_file_is_named(name):
    with pytest.raises(ValueError, match=rf"--gin_file={name}: no such file here or in .*; give "
                                         r"a path to a gin file, or one of base.gin, "):
        configs.parse([name])


def registered(names, *modules) -> list[dict[str, bool]]:
    """Which of `names` are gin configurables once each of `modules` is imported, in turn, in one
    fresh process."""
    code = ("import importlib, sys, gin\n"
            f"for m in {list(modules)}:\n"
            "    importlib.import_module(m)\n"
            "    print({n: bool(gin.config._REGISTRY.matching_selectors(n)) for n in "
            f"{list(names)}}})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    lines = done.stdout.strip().splitlines()[-len(modules):]
    return [eval(line) for line in lines]  # pylint: disable=eval-used


@pytest.mark.slow
def test_skipped_configurables_are_all_a_reader_skips():
    """plan and bench register every configurable a training config binds but some of
    configs.OUTSIDE_THE_STEP, and none of the data stream's; evaluate, which reads data, every one
    but configs.LOOP_CONFIGURABLES; the trainer all of them."""
    bound = {line.split(".")[0] for path in GIN_FILES for line in path.read_text().splitlines()
             if "." in line.split("=")[0] and not line.startswith(("#", "include"))}
    loop, data = set(configs.LOOP_CONFIGURABLES), set(configs.DATA_CONFIGURABLES)
    names = sorted(bound | loop | data)
    by_step_readers = registered(names, "bloom_jax.plan", "bloom_jax.bench")[-1]
    missing = {name for name, found in by_step_readers.items() if not found}
    assert data <= missing <= set(configs.OUTSIDE_THE_STEP) == loop | data
    by_evaluate, with_trainer = registered(names, "bloom_jax.evaluate", "bloom_jax.trainer")
    assert {name for name, found in by_evaluate.items() if not found} == loop
    assert all(with_trainer.values())


def run_command(command: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m bloom_jax.<command> ARGS` (forked: tests/forked_commands.py)."""
    return forked_commands.run([command, *args])


BAD_FLAG_COMMANDS = ["train", "generate"]  # with and without the gin flags


@pytest.fixture(scope="module")
def commands_run(shared_tmp) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """(command, "--help" or a bad flag) -> how the command ended."""
    argvs = [[c, "--help"] for c in COMMANDS] + [[c, "--no_such_flag=1"] for c in BAD_FLAG_COMMANDS]
    return {tuple(argv): result
            for argv, result in zip(argvs, run_commands_once(shared_tmp, "commands_run", *argvs))}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(commands_run, command):
    helped = commands_run[command, "--help"]
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "verbose: On bad input" in helped.stdout  # configs.run's flag: it reports bad flags


@pytest.mark.slow
@pytest.mark.parametrize("command", BAD_FLAG_COMMANDS)
def test_a_bad_flag_is_one_line(commands_run, command):
    bad = commands_run[command, "--no_such_flag=1"]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == configs.EXIT_USAGE
    assert errors == ["error: Unknown command line flag 'no_such_flag' (--help lists the flags)"]
    assert "Traceback" not in bad.stderr


def test_the_tokenizer_command_loads_neither_flax_nor_the_model():
    code = ("import runpy, sys\nsys.argv = ['tokenizer', '--help']\n"
            "try:\n    runpy.run_module('bloom_jax.data.tokenizer', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax' or m in "
            "('bloom_jax.model', 'bloom_jax.trainer')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
