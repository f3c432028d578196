"""Finished runs read back as (parameters, tokens, final eval loss) from what the trainer writes."""

import pathlib

import pytest

from bloom_jax import flops, metric_logger, param_store, runs
from bloom_jax.model import BloomConfig


def write_run(model_dir: pathlib.Path, config: BloomConfig, tokens_per_step: float,
              eval_losses: dict[int, float]) -> None:
    """A run's files as the trainer writes them: config.json and TensorBoard scalars."""
    param_store.save_config(model_dir / "checkpoints", config)
    with metric_logger.MetricsLogger(model_dir, is_primary=True, asynchronous=False) as logger:
        for step in range(1, max(eval_losses) + 1):
            logger.write_scalars(step, {"loss": 5.0, "tokens_seen": step * tokens_per_step})
            if step in eval_losses:
                logger.write_scalars(step, {"eval/loss/all": eval_losses[step],
                                            "eval/loss/roots_fr": eval_losses[step] + 0.5})


def test_a_run_gives_its_parameters_tokens_and_last_eval_loss(tmp_path):
    config = BloomConfig(vocab_size=1024, hidden_size=64, n_layer=3, n_head=4)
    write_run(tmp_path, config, tokens_per_step=2048.0, eval_losses={5: 4.5, 10: 3.25})
    run = runs.read_run(tmp_path)
    assert (run.params, run.tokens, run.loss, run.step) == (
        flops.param_count(config), 10 * 2048.0, 3.25, 10)
    assert runs.read_run(tmp_path, task="roots_fr").loss == 3.75


def test_a_run_without_eval_losses_is_refused_naming_its_tags(tmp_path):
    param_store.save_config(tmp_path / "checkpoints", BloomConfig(vocab_size=256))
    with metric_logger.MetricsLogger(tmp_path, is_primary=True, asynchronous=False) as logger:
        logger.write_scalars(1, {"loss": 5.0, "tokens_seen": 2048})
    with pytest.raises(ValueError, match=r"no logged 'eval/loss/all' \(tags: loss, tokens_seen\)"):
        runs.read_run(tmp_path)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bloom_jax checkpoint directory"):
        runs.read_run(tmp_path)
