"""gin configs: every file parses and takes the shared macros, each released size is the released
model to the parameter, and the `--gin.NAME=VALUE` shorthand."""

import gin
import jax
import numpy as np
import pytest

from bloom_jax import configs, flops, param_store
from bloom_jax.model import BloomConfig

# Reference facts 2: the released models' parameter counts.
RELEASED_PARAMS = {
    "bloom560m": 559_214_592,
    "bloom1b1": 1_065_314_304,
    "bloom1b7": 1_722_408_960,
    "bloom3b": 3_002_557_440,
    "bloom7b1": 7_069_016_064,
    "bloom176b": 176_247_271_424,
}
GIN_FILES = sorted(configs.GIN_CONFIGS_DIR.glob("*.gin"))
RUN_CONFIGS = [path.stem for path in GIN_FILES if path.stem != "base"]


def model_config() -> BloomConfig:
    """The BloomConfig the parsed gin config builds."""
    return configs.BloomConfig()


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
    configs.parse([str(path)])
    assert gin.query_parameter("%SEQUENCE_LENGTH") > 0
    if path.stem != "base":  # base.gin leaves the model's size to the size files
        config = model_config()
        assert config.head_dim * config.n_head == config.hidden_size


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_config_takes_the_shared_macros(name):
    configs.parse([f"{name}.gin"], [
        "MODEL_DIR = '/runs/x'", "DATA_DIR = '/data/roots'", "TRAIN_STEPS = 7",
        "BATCH_SIZE = 48", "SEQUENCE_LENGTH = 64", "SEED = 5", "INIT_FROM = '/ckpt/hf'"])
    train = gin.get_bindings("train")
    assert (train["model_dir"], train["train_steps"], train["seed"], train["init_from"]) == (
        "/runs/x", 7, 5, "/ckpt/hf")
    stream = gin.get_bindings("make_stream")
    assert (stream["data_dir"], stream["sequence_length"], stream["seed"]) == (
        "/data/roots", 64, 5)
    assert gin.get_bindings("BatchRampUp")["global_batch_size"] == 48


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
    ("--gin.train.model_config=@BloomConfig()", "train.model_config = @BloomConfig()"),
    ("--gin.make_stream.seed=%SEED", "make_stream.seed = %SEED"),
    ("--gin.x=a=b", "x = 'a=b'"),
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
