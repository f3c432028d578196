"""Scaling laws: the Chinchilla point, the optimum, and the approach-3 fit on synthetic runs."""

import numpy as np
import pytest

from bloom_jax import scaling

GOPHER_FLOPS = 5.76e23  # Chinchilla's budget: 70B parameters on 1.4T tokens


def test_default_law_reproduces_the_chinchilla_point():
    params, tokens = scaling.LAWS[scaling.DEFAULT_LAW].optimum(GOPHER_FLOPS)
    assert params == pytest.approx(70e9, rel=0.1)
    assert tokens == pytest.approx(1.4e12, rel=0.1)
    assert 6 * params * tokens == pytest.approx(GOPHER_FLOPS)


def test_published_constants_miss_the_chinchilla_point_as_the_docstring_says():
    params, tokens = scaling.HOFFMANN2022.optimum(GOPHER_FLOPS)
    assert params < 0.5 * 70e9 and tokens > 2 * 1.4e12


@pytest.mark.parametrize("law", [*scaling.LAWS.values()], ids=lambda law: law.name)
def test_optimum_is_the_least_loss_on_its_iso_flop_line(law):
    params, tokens = law.optimum(1e21)
    sizes = params * np.geomspace(0.5, 2, 41)
    losses = law.loss(sizes, 1e21 / (6 * sizes))
    assert sizes[np.argmin(losses)] == pytest.approx(params, rel=0.02)


def test_kaplan_puts_more_of_the_budget_into_parameters_than_chinchilla():
    kaplan_params, _ = scaling.KAPLAN2020.optimum(GOPHER_FLOPS)
    chinchilla_params, _ = scaling.BESIROGLU2024.optimum(GOPHER_FLOPS)
    assert kaplan_params > 5 * chinchilla_params
    assert kaplan_params == pytest.approx(1.3e9 * (GOPHER_FLOPS / scaling.PF_DAY) ** 0.73)


def synthetic_runs(law, noise, seed=1):
    """Runs on a 6 x 4 grid of sizes and token counts, losses from `law` with log-normal noise."""
    rng = np.random.default_rng(seed)
    params = np.repeat(np.geomspace(1e7, 3e9, 6), 4)
    tokens = np.tile(np.geomspace(1e9, 3e11, 4), 6) * rng.uniform(0.8, 1.25, 24)
    return params, tokens, law.loss(params, tokens) * np.exp(rng.normal(0, noise, 24))


def test_fit_recovers_the_law_its_runs_came_from():
    truth = scaling.BESIROGLU2024
    fitted = scaling.fit(*synthetic_runs(truth, noise=0.003))
    assert fitted.E == pytest.approx(truth.E, abs=0.03)
    assert fitted.alpha == pytest.approx(truth.alpha, abs=0.02)
    assert fitted.beta == pytest.approx(truth.beta, abs=0.02)
    assert fitted.A == pytest.approx(truth.A, rel=0.3)
    assert fitted.B == pytest.approx(truth.B, rel=0.3)
    assert fitted.optimum(GOPHER_FLOPS)[0] == pytest.approx(truth.optimum(GOPHER_FLOPS)[0],
                                                            rel=0.15)


def test_fit_of_noiseless_runs_is_exact():
    truth = scaling.HOFFMANN2022
    fitted = scaling.fit(*synthetic_runs(truth, noise=0.0))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3), name


def test_bootstrap_interval_covers_the_truth():
    truth = scaling.BESIROGLU2024
    fits = scaling.bootstrap(*synthetic_runs(truth, noise=0.003), resamples=20)
    for name in ("E", "alpha", "beta"):
        low, high = np.percentile([getattr(f, name) for f in fits], [5, 95])
        assert low <= getattr(truth, name) <= high, name


def test_fit_needs_a_run_per_constant():
    params, tokens, losses = synthetic_runs(scaling.BESIROGLU2024, noise=0.0)
    with pytest.raises(ValueError, match="at least 5 runs; got 4"):
        scaling.fit(params[:4], tokens[:4], losses[:4])
