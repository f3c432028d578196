"""Scaling laws: the loss a model of N parameters reaches after D tokens, the compute-optimal
(N, D) for a FLOP budget, and the fit of such a law to one's own finished runs.

Chinchilla (Hoffmann et al. 2022, approach 3) models the loss as

    L(N, D) = E + A / N^alpha + B / D^beta,

and under C = 6 N D its minimum over N is at N = G (C/6)^(beta/(alpha+beta)), D = C / (6 N),
with G = (alpha A / (beta B))^(1/(alpha+beta)). Two sets of constants are offered, both honest:

- "hoffmann2022": the paper's published fit (E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28).
  It does NOT reproduce the paper's own headline point: at Gopher's 5.76e23 FLOPs it gives 32B
  parameters and 3.0T tokens, not Chinchilla's 70B and 1.4T.
- "besiroglu2024": the refit of the paper's data by Besiroglu et al. 2024 ("Chinchilla scaling:
  a replication attempt"; E 1.82, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658), which gives
  72B and 1.33T at 5.76e23 FLOPs (about 20 tokens per parameter). It is the default.

Kaplan et al. 2020 model the loss of N non-embedding parameters as
L(N, D) = ((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D and put the compute-efficient size
at N = 1.3e9 (C / PF-day)^0.73. Their losses are nats per token of WebText2 under GPT-2's
tokenizer, Chinchilla's of MassiveText under SentencePiece: neither is BLOOM's validation loss
(ROOTS, 250,880-token BPE), so compare the predicted losses between shapes, not with a logged
BLOOM loss. Fitting one's own runs (`fit`) gives a law in one's own loss.

The fit is Hoffmann et al.'s approach 3: minimize the Huber loss (delta 1e-3) between
LSE(a - alpha log N, b - beta log D, e) and log L, with A = e^a, B = e^b, E = e^e, from the best
points of their grid of starts; its uncertainty comes from refitting bootstrap resamples of the
runs. The minimizer is BFGS, the full-memory form of their L-BFGS: with five unknowns a limited
memory saves nothing, and scipy's L-BFGS-B calls into a multithreaded BLAS for 5-vectors, which
made it 30x slower on a busy 2-core machine.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import optimize, special

PF_DAY = 1e15 * 86400  # FLOPs in a petaflop/s-day, Kaplan et al.'s unit of compute


@dataclasses.dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, N total parameters and D training tokens."""

    name: str
    E: float  # pylint: disable=invalid-name
    A: float  # pylint: disable=invalid-name
    B: float  # pylint: disable=invalid-name
    alpha: float
    beta: float

    def loss(self, params: float | np.ndarray, tokens: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens,
                                                                                  self.beta)

    def optimum(self, flops: float) -> tuple[float, float]:
        """The (parameters, tokens) of least loss among those with 6 N D = `flops`."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        params = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return params, flops / (6 * params)


HOFFMANN2022 = ParametricLaw("hoffmann2022", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU2024 = ParametricLaw("besiroglu2024", E=1.82, A=482.01, B=2085.43, alpha=0.3478,
                              beta=0.3658)
LAWS = {law.name: law for law in (BESIROGLU2024, HOFFMANN2022)}
DEFAULT_LAW = BESIROGLU2024.name


@dataclasses.dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020: eq. 1.5 for the loss, §6.1 for the compute-efficient size."""

    name: str = "kaplan2020"
    n_c: float = 8.8e13  # non-embedding parameters
    d_c: float = 5.4e13  # tokens
    alpha_n: float = 0.076
    alpha_d: float = 0.095
    size_at_pf_day: float = 1.3e9  # N_opt = size_at_pf_day (C / PF-day)^size_exponent
    size_exponent: float = 0.73

    def loss(self, non_embedding_params: float, tokens: float) -> float:
        return ((self.n_c / non_embedding_params) ** (self.alpha_n / self.alpha_d)
                + self.d_c / tokens) ** self.alpha_d

    def optimum(self, flops: float) -> tuple[float, float]:
        """The compute-efficient (non-embedding parameters, tokens), tokens from C = 6 N D."""
        params = self.size_at_pf_day * (flops / PF_DAY) ** self.size_exponent
        return params, flops / (6 * params)


KAPLAN2020 = KaplanLaw()

# ------------------------------------------------------------------------------------------------
# Fitting a parametric law (Hoffmann et al. 2022, appendix D.2).

HUBER_DELTA = 1e-3
# Their grid of starts: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in
# {0, 5, ..., 25}; columns ordered as the fit's vector (a, b, e, alpha, beta).
START_GRID = np.array(list(itertools.product(
    np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))), dtype=np.float64)
MIN_RUNS = 5  # one per constant


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
               log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log-loss residuals and its gradient in (a, b, e, alpha, beta),
    divided by delta^2: unscaled, the objective is ~1e-5 and L-BFGS stops at its first flat
    stretch, the early termination Besiroglu et al. found in the original fit."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = special.logsumexp(terms, axis=0)
    residual = predicted - log_loss
    huber = np.where(np.abs(residual) <= HUBER_DELTA, 0.5 * residual**2,
                     HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)
    weights = np.exp(terms - predicted) * slope  # d predicted / d term, times d huber / d residual
    grad = np.array([weights[0].sum(), weights[1].sum(), weights[2].sum(),
                     -(weights[0] * log_n).sum(), -(weights[1] * log_d).sum()])
    return float(huber.sum()) / HUBER_DELTA**2, grad / HUBER_DELTA**2


def _grid_objective(log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """The objective at every point of START_GRID at once."""
    a, b, e, alpha, beta = (START_GRID[:, i, None] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    residual = np.abs(predicted - log_loss)
    return np.where(residual <= HUBER_DELTA, 0.5 * residual**2,
                    HUBER_DELTA * (residual - 0.5 * HUBER_DELTA)).sum(axis=1)


def fit(params: np.ndarray, tokens: np.ndarray, losses: np.ndarray, name: str = "fit",
        starts: int = 8) -> ParametricLaw:
    """The law minimizing the Huber loss on log-loss over runs (N_i, D_i, L_i), by L-BFGS from
    the `starts` best points of Hoffmann et al.'s grid (all 4,500 are evaluated, vectorized)."""
    params, tokens, losses = (np.asarray(x, np.float64) for x in (params, tokens, losses))
    if not params.shape == tokens.shape == losses.shape or params.ndim != 1:
        raise ValueError("params, tokens and losses must be 1-D arrays of one length.")
    if len(params) < MIN_RUNS:
        raise ValueError(f"a fit of E, A, B, alpha and beta needs at least {MIN_RUNS} runs; got "
                         f"{len(params)}.")
    if min(params.min(), tokens.min(), losses.min()) <= 0:
        raise ValueError("parameter counts, token counts and losses must all be positive.")
    data = (np.log(params), np.log(tokens), np.log(losses))
    best = None
    for start in START_GRID[np.argsort(_grid_objective(*data))[:starts]]:
        result = optimize.minimize(_objective, start, args=data, jac=True, method="BFGS",
                                   options={"gtol": 1e-8})
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return ParametricLaw(name, E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
                         alpha=float(alpha), beta=float(beta))


def bootstrap(params: np.ndarray, tokens: np.ndarray, losses: np.ndarray, resamples: int = 100,
              seed: int = 0) -> list[ParametricLaw]:
    """Fits of `resamples` resamples of the runs, drawn with replacement (the uncertainty)."""
    params, tokens, losses = (np.asarray(x, np.float64) for x in (params, tokens, losses))
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < resamples:
        pick = rng.integers(0, len(params), len(params))
        if len(np.unique(pick)) >= MIN_RUNS:  # a resample with fewer distinct runs is degenerate
            fits.append(fit(params[pick], tokens[pick], losses[pick], name="bootstrap", starts=4))
    return fits
