"""Monte-Carlo estimate of the step-level optimum, and how far a Gaussian kernel is from it (docs/design.md
§5).

At a state ``s`` with reference kernel ``p_ref(a|s) = N(mu_ref, sigma^2)`` the step-level optimum for a
reward ``r`` and KL coefficient ``beta`` is ``pi*(a|s) ∝ p_ref(a|s) exp(r(s, a) / beta)``. Its moments are
estimated by self-normalised importance sampling over ``M`` reference actions drawn in antithetic pairs
``a = mu_ref ± sigma z`` (``GaussianStep.sample(..., antithetic=True)``):

    w_j   = softmax_j(r(s, a_j) / beta)
    mu*   ≈ sum_j w_j a_j
    var*  ≈ sum_j w_j (a_j - mu*)^2 / (1 - sum_j w_j^2)          (reliability-weight correction)

A kernel ``N(mu_theta, var_theta)`` is compared with it by its drift from the reference mean,
``d_theta = mu_theta - mu_ref`` against ``d* = mu* - mu_ref``, pooled over the states of one step (the step's
drift field as one vector). The squared norm of a Monte-Carlo estimate of ``d*`` is biased upward by the
estimator's variance; the figures here use two independent halves of the actions, ``d_A`` and ``d_B``, so that

    |d*|^2          ≈ <d_A, d_B>                       (unbiased: the halves' noise is independent)
    <d_theta, d*>   ≈ <d_theta, (d_A + d_B) / 2>
    |d_theta - d*|^2 ≈ |d_theta|^2 - 2 <d_theta, d*> + |d*|^2

and report

    relative_drift_error = |d_theta - d*| / |d*|,   cosine = <d_theta, d*> / (|d_theta| |d*|),
    drift_ratio = |d_theta| / |d*|,                  variance_ratio = mean var_theta / mean var*.

With few actions the corrected ``|d*|^2`` is itself noisy, so the cosine can leave ``[-1, 1]``; at the
benchmark's ``M = 256`` and above it stays inside unless the optimum barely moves at that step.

Their Monte-Carlo standard errors come from a bootstrap over the action pairs (resampled within each half).

Averaged over steps, a step whose optimum hardly moves (``|d*|`` near 0) can dominate any relative figure.
The path-pooled figures weigh each step by its optimum's drift in units of ``sigma_t``: with the same
three sums in units of ``sigma_t^2``, summed over the steps ``t``,

    path_relative_error = sqrt( sum_t |d_theta - d*|^2 / sigma_t^2  /  sum_t |d*|^2 / sigma_t^2 ),

which for kernels with the reference's variance is ``sqrt(KL(theta path || pi* path) / KL(ref path || pi*
path))`` (each step's KL is ``|mean difference|^2 / (2 sigma_t^2)``): the share of the reference's distance to
the optimal path that is left. ``path_cosine`` and ``path_drift_ratio`` pool the same way.
Everything here is pure maths on tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FIELDS = ("relative_drift_error", "cosine", "drift_ratio", "variance_ratio")


def halves(num_actions: int) -> tuple[slice, slice]:
    """Two independent halves of ``num_actions`` antithetic actions: whole pairs in each (``num_actions``
    must be a multiple of 4)."""
    if num_actions % 4:
        raise ValueError(f"the number of actions must be a multiple of 4, got {num_actions}")
    half = num_actions // 2
    return slice(0, half), slice(half, num_actions)


def tilted_moments(
    actions: torch.Tensor, log_weights: torch.Tensor, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-normalised moments of ``pi* ∝ p_ref exp(log_weights)`` from reference ``actions`` ``[M, B, D]``.

    ``log_weights`` ``[M, B]`` is ``r / beta``; ``counts`` ``[M, B]`` (optional) are bootstrap multiplicities.
    Returns ``(mean [B, D], variance [B] (mean over D, reliability-corrected), ess_share [B])`` where
    ``ess_share = 1 / (M sum_j w_j^2)``.
    """
    logits = log_weights.double()
    if counts is not None:
        logits = logits + counts.double().log()
    w = torch.softmax(logits, dim=0)  # [M, B]
    a = actions.double()
    mean = torch.einsum("mb,mbd->bd", w, a)
    second = torch.einsum("mb,mbd->bd", w, (a - mean) ** 2).mean(1)
    sum_sq = (w**2).sum(0)
    variance = second / (1 - sum_sq).clamp(min=1e-12)
    return mean, variance, 1.0 / (len(actions) * sum_sq)


@dataclass(frozen=True)
class StepOptimum:
    """The optimum's estimates at the ``S`` states of one step: drifts from both halves ``[S, D]``, the
    full-sample variance ``[S]`` and the effective sample size share ``[S]``."""

    drift_a: torch.Tensor
    drift_b: torch.Tensor
    variance: torch.Tensor
    ess_share: torch.Tensor


def estimate_optimum(
    actions: torch.Tensor, reference_mean: torch.Tensor, log_weights: torch.Tensor, counts=None
) -> StepOptimum:
    """:class:`StepOptimum` from actions ``[M, S, D]`` drawn around ``reference_mean`` ``[S, D]`` with
    ``log_weights = r / beta`` ``[M, S]``."""
    first, second = halves(len(actions))
    parts = []
    for part in (first, second):
        c = None if counts is None else counts[part]
        parts.append(tilted_moments(actions[part], log_weights[part], c)[0] - reference_mean.double())
    _, variance, ess = tilted_moments(actions, log_weights, counts)
    return StepOptimum(parts[0], parts[1], variance, ess)


def exact_optimum(mean: torch.Tensor, variance: torch.Tensor, reference_mean: torch.Tensor) -> StepOptimum:
    """:class:`StepOptimum` of an optimum known in closed form (a latent quadratic reward's, mean ``[S, ...]``
    and variance broadcastable to it): both "halves" are the exact drift, so every figure is exact."""
    drift = (mean - reference_mean).double().flatten(1)
    variance = variance.double().expand_as(mean).flatten(1).mean(1)
    return StepOptimum(drift, drift, variance, torch.ones(len(drift), dtype=torch.float64))


def kernel_errors(drift: torch.Tensor, variance: torch.Tensor, optimum: StepOptimum) -> dict[str, float]:
    """The module docstring's noise-corrected figures for a kernel with drift ``mu_theta - mu_ref`` ``[S, D]``
    and variance ``[S]`` (mean over dimensions) against ``optimum``; ``nan`` where the optimum's drift is not
    distinguishable from noise (``<d_A, d_B> <= 0``)."""
    drift = drift.double()
    optimum_sq = float((optimum.drift_a * optimum.drift_b).sum())
    cross = float((drift * (optimum.drift_a + optimum.drift_b) / 2).sum())
    own_sq = float((drift**2).sum())
    variance_ratio = float(variance.double().sum() / optimum.variance.sum())
    if optimum_sq <= 0:
        return dict(zip(FIELDS, (math.nan, math.nan, math.nan, variance_ratio)))
    error_sq = max(own_sq - 2 * cross + optimum_sq, 0.0)
    return {
        "relative_drift_error": math.sqrt(error_sq / optimum_sq),
        "cosine": cross / math.sqrt(own_sq * optimum_sq) if own_sq > 0 else math.nan,
        "drift_ratio": math.sqrt(own_sq / optimum_sq),
        "variance_ratio": variance_ratio,
    }


def drift_energies(drift: torch.Tensor, optimum: StepOptimum, sigma: float) -> dict[str, float]:
    """``{"own", "cross", "optimum"}``: ``|d_theta|^2``, ``<d_theta, d*>`` and the noise-corrected
    ``|d*|^2`` of :func:`kernel_errors`, in units of ``sigma^2``: summed over steps by :func:`path_errors`."""
    drift = drift.double()
    return {
        "own": float((drift**2).sum()) / sigma**2,
        "cross": float((drift * (optimum.drift_a + optimum.drift_b) / 2).sum()) / sigma**2,
        "optimum": float((optimum.drift_a * optimum.drift_b).sum()) / sigma**2,
    }


PATH_FIELDS = ("path_relative_error", "path_cosine", "path_drift_ratio")


def path_errors(energies: list[dict[str, float]]) -> dict[str, float]:
    """The module docstring's path-pooled figures from the per-step :func:`drift_energies`."""
    own, cross, optimum = (sum(e[k] for e in energies) for k in ("own", "cross", "optimum"))
    if optimum <= 0:
        return dict.fromkeys(PATH_FIELDS, math.nan)
    return {
        "path_relative_error": math.sqrt(max(own - 2 * cross + optimum, 0.0) / optimum),
        "path_cosine": cross / math.sqrt(own * optimum) if own > 0 else math.nan,
        "path_drift_ratio": math.sqrt(own / optimum),
    }


def optimum_summary(optimum: StepOptimum, sigma: float) -> dict[str, float]:
    """How far the optimum moves at this step and how noisy its estimate is: the drift's RMS per dimension in
    units of ``sigma``, the noise share ``(|d_hat|^2 - |d*|^2) / |d*|^2`` of the naive estimate, the mean
    ``var* / sigma^2`` and the mean effective sample size share."""
    estimate = (optimum.drift_a + optimum.drift_b) / 2
    optimum_sq = float((optimum.drift_a * optimum.drift_b).sum())
    naive_sq = float((estimate**2).sum())
    size = estimate.numel()
    return {
        "drift_over_sigma": math.sqrt(max(optimum_sq, 0.0) / size) / sigma,
        "noise_share": (naive_sq - optimum_sq) / optimum_sq if optimum_sq > 0 else math.inf,
        "variance_over_sigma2": float(optimum.variance.mean()) / sigma**2,
        "ess_share": float(optimum.ess_share.mean()),
    }


def bootstrap_counts(num_actions: int, states: int, generator: torch.Generator) -> torch.Tensor:
    """Multiplicities ``[M, S]`` for one bootstrap replicate: antithetic pairs resampled with replacement
    within each half, independently per state (both actions of a pair share the pair's count)."""
    first, second = halves(num_actions)
    pairs_per_half = num_actions // 4
    counts = []
    for _ in (first, second):
        picks = torch.randint(0, pairs_per_half, (pairs_per_half, states), generator=generator)
        pair_counts = torch.zeros(pairs_per_half, states).scatter_add_(
            0, picks, torch.ones_like(picks, dtype=torch.float)
        )
        counts.append(pair_counts.repeat_interleave(2, dim=0))
    return torch.cat(counts)
