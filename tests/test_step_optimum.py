"""The Monte-Carlo step optimum and the kernel figures (training/step/optimum.py) on Gaussians whose tilted
optimum is known in closed form: reference N(mu, s^2 I), reward r(a) = b.a - c |a - mu|^2 / 2, so
pi* = N(mu + v b / beta, v) with v = s^2 / (1 + s^2 c / beta)."""

import math

import pytest
import torch

from training.step.kernel import GaussianStep
from training.step.optimum import (
    bootstrap_counts,
    drift_energies,
    estimate_optimum,
    halves,
    kernel_errors,
    optimum_summary,
    path_errors,
    tilted_moments,
)

STATES, DIM, BETA = 64, 4, 0.5


def antithetic_actions(mean, std, pairs, generator):
    return GaussianStep(mean, (std**2).expand_as(mean)).sample(generator, num=2 * pairs, antithetic=True)


def quadratic_problem(curvature: float, actions: int, seed: int = 0, slope: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(STATES, DIM, generator=generator)
    std = torch.tensor(0.3)
    b = torch.randn(STATES, DIM, generator=generator) * slope
    a = antithetic_actions(mu, std, actions // 2, generator)
    reward = (b * a).sum(-1) - curvature * ((a - mu) ** 2).sum(-1) / 2
    variance = std**2 / (1 + std**2 * curvature / BETA)
    exact_mean = mu + variance * b / BETA
    return mu, a, reward / BETA, exact_mean, variance.expand(STATES)


def test_antithetic_pairs_mirror_the_mean():
    mean = torch.randn(3, 5)
    a = antithetic_actions(mean, torch.tensor(2.0), 4, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 5)
    torch.testing.assert_close((a[0::2] + a[1::2]) / 2, mean.expand(4, 3, 5))


@pytest.mark.parametrize("curvature", [0.0, 4.0])
def test_estimate_recovers_the_closed_form_optimum(curvature):
    mu, a, log_w, exact_mean, exact_var = quadratic_problem(curvature, 4096)
    mean, variance, ess = tilted_moments(a, log_w)
    assert (mean.float() - exact_mean).norm() / (exact_mean - mu).norm() < 0.08
    assert abs(float(variance.mean() / exact_var.mean()) - 1) < 0.03
    assert 0 < float(ess.min()) <= float(ess.max()) <= 1


@pytest.mark.parametrize("curvature", [0.0, 4.0])
def test_the_exact_kernel_scores_perfectly_and_the_reference_scores_zero(curvature):
    mu, a, log_w, exact_mean, exact_var = quadratic_problem(curvature, 256)
    optimum = estimate_optimum(a, mu, log_w)
    exact = kernel_errors(exact_mean - mu, exact_var, optimum)
    assert exact["relative_drift_error"] < 0.2  # a noisy zero, clipped at 0 before the square root
    assert exact["cosine"] > 0.97
    assert abs(exact["drift_ratio"] - 1) < 0.05
    assert abs(exact["variance_ratio"] - 1) < 0.05
    reference = kernel_errors(torch.zeros_like(mu), torch.full((STATES,), 0.09), optimum)
    assert abs(reference["relative_drift_error"] - 1) < 0.05
    assert reference["drift_ratio"] == 0
    half = kernel_errors((exact_mean - mu) / 2, exact_var, optimum)
    assert abs(half["relative_drift_error"] - 0.5) < 0.05 and half["cosine"] > 0.97


def test_noise_correction_removes_the_estimators_inflation():
    """With few actions the naive |d_hat|^2 overstates |d*|^2; the split-half figure does not, on average."""
    ratios, naive = [], []
    for seed in range(20):
        mu, a, log_w, exact_mean, exact_var = quadratic_problem(0.0, 16, seed, slope=0.15)
        optimum = estimate_optimum(a, mu, log_w)
        # drift_ratio^-2 = (estimated |d*|^2) / |d_exact|^2
        ratios.append(kernel_errors(exact_mean - mu, exact_var, optimum)["drift_ratio"] ** -2)
        naive.append(1 + optimum_summary(optimum, 0.3)["noise_share"])
    assert abs(sum(ratios) / len(ratios) - 1) < 0.05
    assert sum(naive) / len(naive) > 1.4  # what the correction removes


def test_path_pooling_weighs_steps_by_the_optimums_drift():
    """Two steps: one where the kernel is exact and the optimum moves, one where the optimum moves a tenth as
    far and the kernel overshoots it threefold. The per-step mean is dominated by the second, the path figure
    is not."""
    mu, a, log_w, exact_mean, exact_var = quadratic_problem(0.0, 1024)
    moving = estimate_optimum(a, mu, log_w)
    still_mu, still_a, still_log_w, still_mean, _ = quadratic_problem(0.0, 1024, seed=1, slope=0.05)
    still = estimate_optimum(still_a, still_mu, still_log_w)
    drifts = [(exact_mean - mu, moving), (3 * (still_mean - still_mu), still)]
    per_step = [kernel_errors(d, exact_var, o)["relative_drift_error"] for d, o in drifts]
    assert per_step[0] < 0.1 and 1.7 < per_step[1] < 2.3
    pooled = path_errors([drift_energies(d, o, sigma=0.3) for d, o in drifts])
    assert pooled["path_relative_error"] < 0.35 and sum(per_step) / 2 > 0.8
    assert pooled["path_cosine"] > 0.95
    # sigma only rescales every step alike
    same = path_errors([drift_energies(d, o, sigma=3.0) for d, o in drifts])
    assert same["path_relative_error"] == pytest.approx(pooled["path_relative_error"])


def test_no_measurable_drift_gives_nan_not_a_number():
    mu = torch.zeros(4, 8)
    a = antithetic_actions(mu, torch.tensor(1.0), 8, torch.Generator().manual_seed(0))
    optimum = estimate_optimum(a, mu, torch.zeros(16, 4))  # flat reward: the optimum is the reference
    errors = kernel_errors(torch.ones(4, 8), torch.ones(4), optimum)
    assert all(math.isnan(errors[k]) for k in ("relative_drift_error", "cosine", "drift_ratio"))


def test_bootstrap_counts_resample_whole_pairs_within_halves():
    counts = bootstrap_counts(16, 5, torch.Generator().manual_seed(0))
    first, second = halves(16)
    assert counts.shape == (16, 5)
    torch.testing.assert_close(counts[0::2], counts[1::2])
    assert (counts[first].sum(0) == 8).all() and (counts[second].sum(0) == 8).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        halves(10)
