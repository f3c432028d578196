"""The parameter store on a tiny random model: which directory --ckpt_dir means, and loading and
opening from a checkpoint directory or a training run's MODEL_DIR alike."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from bloom_jax import param_store
from bloom_jax.model import BloomConfig, BloomForCausalLM

CONFIG = BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)


@pytest.fixture
def saved_run(tmp_path):
    """(MODEL_DIR, params) of a run whose checkpoints/ holds random parameters at step 5."""
    variables = BloomForCausalLM(CONFIG).init(jax.random.PRNGKey(3), np.zeros([1, 1], np.int32))
    params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    param_store.save_params(tmp_path / "checkpoints", CONFIG, params, step=5)
    return tmp_path, params


def test_checkpoint_dir_is_the_directory_holding_config_json(saved_run):
    model_dir, _ = saved_run
    assert param_store.checkpoint_dir(model_dir / "checkpoints") == model_dir / "checkpoints"
    assert param_store.checkpoint_dir(str(model_dir)) == model_dir / "checkpoints"


def test_checkpoint_dir_leaves_other_paths_alone(tmp_path):
    assert param_store.checkpoint_dir(tmp_path) == tmp_path
    (tmp_path / "checkpoints").mkdir()
    param_store.save_config(tmp_path, CONFIG)  # config.json at the root wins over checkpoints/
    assert param_store.checkpoint_dir(tmp_path) == tmp_path


@pytest.mark.parametrize("subdir", ["checkpoints", ""])
def test_load_params_takes_the_checkpoint_directory_or_the_model_dir(saved_run, subdir):
    model_dir, params = saved_run
    config, loaded = param_store.load_params(model_dir / subdir)
    assert config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


@pytest.mark.parametrize("subdir", ["checkpoints", ""])
def test_open_params_takes_the_checkpoint_directory_or_the_model_dir(saved_run, subdir):
    model_dir, params = saved_run
    config, stores = param_store.open_params(model_dir / subdir)
    assert config == CONFIG
    jax.tree.map(lambda store, x: np.testing.assert_array_equal(store.read().result(), x),
                 stores, params)


def test_load_config_of_a_missing_directory_says_what_a_checkpoint_holds(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent/config.json not found: .*absent is not a "
                                                r"bloom_jax checkpoint directory .*MODEL_DIR"):
        param_store.load_config(tmp_path / "absent")


def test_loading_a_model_dir_without_checkpoints_names_the_missing_config(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoints/config.json not found"):
        param_store.load_params(tmp_path)
