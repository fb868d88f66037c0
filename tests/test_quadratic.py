"""Latent quadratic rewards: an exactly Gaussian step optimum (closed form checked against the Monte-Carlo
estimator), the trainer's Laplace proposal that draws from it, and the exact kernel check."""

import math

import pytest
import torch

from training.rewards import LatentQuadratic, combine_quadratics, load_reward
from training.step.kernel import GaussianStep, tilted_gaussian
from training.step.optimum import estimate_optimum, exact_optimum, kernel_errors
from training.trainer import linearised_proposal, step_reward_curvature, target_weights


def quadratic_config(tiny_config, **train):
    settings = {"x0_estimate": "current_eps", "gradient_proposal": 1.0, "curvature_proposal": True}
    return tiny_config.model_copy(
        update={
            "train": tiny_config.train.model_copy(update={**settings, **train}),
            "objectives": [],
        }
    )


def test_tilted_gaussian_is_the_normalised_product():
    reference = GaussianStep(torch.tensor([[0.5, -1.0]]), torch.tensor(0.25))
    target, k = torch.tensor([[2.0, 1.0]]), 3.0
    product = tilted_gaussian(reference, target, k)
    a = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    for dim in range(2):
        log_density = -((a - reference.mean[0, dim]) ** 2) / (2 * 0.25) - k / 2 * (a - target[0, dim]) ** 2
        w = torch.softmax(log_density, 0)
        mean = float((w * a).sum())
        assert product.mean[0, dim].item() == pytest.approx(mean, abs=1e-6)
        assert float(product.variance) == pytest.approx(float((w * (a - mean) ** 2).sum()), rel=1e-5)


def test_weighted_quadratics_combine_into_one(tiny_config):
    centers = torch.randn(2, 3, 4, 2, 2)
    first = LatentQuadratic(0.5, lambda prompts: centers[0][: len(prompts)])
    second = LatentQuadratic(2.0, lambda prompts: centers[1][: len(prompts)])
    combined = combine_quadratics([(first, 0.25), (second, 0.75)])
    z, prompts = torch.randn(3, 4, 2, 2), ["a"] * 3
    direct = 0.25 * first(z, prompts) + 0.75 * second(z, prompts)
    # equal up to a constant per prompt: compare differences between two latents
    z2 = torch.randn(3, 4, 2, 2)
    direct2 = 0.25 * first(z2, prompts) + 0.75 * second(z2, prompts)
    assert combined.curvature == pytest.approx(0.25 * 0.5 + 0.75 * 2.0)
    torch.testing.assert_close(combined(z, prompts) - combined(z2, prompts), direct - direct2)


def test_latent_rewards_peak_at_their_centres(tiny_config, tiny_reference, tiny_home):
    prototype = load_reward("latent_prototype", tiny_config, tiny_home, {"sharpness": 0.5})
    blank = load_reward("latent_blank", tiny_config, tiny_home, {})
    assert prototype.on_latents and prototype.quadratic and blank.quadratic
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    centers = prototype.quadratic.center(prompts)
    assert not torch.allclose(centers[0], centers[1])  # one prototype per digit
    torch.testing.assert_close(prototype(centers, prompts), torch.zeros(2))
    moved = centers + 0.1
    assert (prototype(moved, prompts) < 0).all()
    assert blank.quadratic.curvature == pytest.approx(10 * 0.003)  # the defaults differ tenfold
    with pytest.raises(ValueError, match="sharpness"):
        load_reward("latent_blank", tiny_config, tiny_home, {"sharpness": 0})
    with pytest.raises(ValueError, match="mix latent rewards"):
        config = tiny_config.model_copy(update={"objectives": []})
        load_reward("weighted_sum", config, tiny_home, {"terms": {"latent_blank": 0.5, "ink_economy": 0.5}})


def _problem(config, home, reward):
    from training.reference.loader import load_reference_pipeline
    from training.sd_problem import DiffusionStepProblem

    return DiffusionStepProblem.from_config(
        load_reference_pipeline(config, home, progress=False), reward, config
    )


@torch.no_grad()
def test_exact_optimum_matches_the_monte_carlo_estimate(tiny_config, tiny_reference, tiny_home):
    config = quadratic_config(tiny_config)
    reward = load_reward("latent_prototype", config, tiny_home, {"sharpness": 0.02})
    problem = _problem(config, tiny_home, reward)
    generator = torch.Generator().manual_seed(0)
    x_t, cond = problem.initial_states(3, generator)
    beta, step = 0.5, 1
    exact = problem.quadratic_optimum(x_t, step, cond, beta)
    reference = problem.reference(x_t, step, cond)
    assert float(exact.variance.max()) < float(reference.variance) * 0.99  # narrower than the reference
    actions = reference.sample(generator, num=40_000, antithetic=True)
    rewards = problem.step_reward(x_t, actions, step, cond)
    estimate = estimate_optimum(actions.flatten(2), reference.mean.flatten(1), rewards / beta)
    optimum = exact_optimum(exact.mean, exact.variance, reference.mean)
    drift = (estimate.drift_a + estimate.drift_b) / 2
    errors = kernel_errors(drift.float(), estimate.variance.float(), optimum)
    # the estimate's own Monte-Carlo noise, from its two independent halves
    noise = float((estimate.drift_a - estimate.drift_b).norm() / 2 / optimum.drift_a.norm())
    assert noise < 0.2
    assert errors["relative_drift_error"] < 1.5 * noise  # what is left is the estimator's noise
    assert errors["cosine"] > 0.98 and errors["drift_ratio"] == pytest.approx(1.0, abs=0.05)
    assert errors["variance_ratio"] == pytest.approx(1.0, abs=0.01)


@torch.no_grad()
def test_the_laplace_proposal_is_the_optimum_and_its_weights_are_uniform(
    tiny_config, tiny_reference, tiny_home
):
    from training.trainer import step_reward_gradient

    config = quadratic_config(tiny_config)
    reward = load_reward("latent_blank", config, tiny_home, {"sharpness": 0.3})
    problem = _problem(config, tiny_home, reward)
    generator = torch.Generator().manual_seed(1)
    x_t, cond = problem.initial_states(4, generator)
    beta, step = 0.01, 0
    reference = problem.reference(x_t, step, cond)
    gradient = step_reward_gradient(problem, x_t, reference.mean, step, cond)
    curvature = step_reward_curvature(problem, x_t, reference, step, cond, generator)
    proposal = linearised_proposal(reference, gradient, beta, 1.0, curvature)
    exact = problem.quadratic_optimum(x_t, step, cond, beta)
    torch.testing.assert_close(proposal.mean, exact.mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        proposal.variance.flatten(), exact.variance.flatten().expand(4), rtol=1e-3, atol=0
    )
    assert float(exact.variance.max() / reference.variance) < 0.9  # a real narrowing at this step
    actions = proposal.sample(generator, num=8, antithetic=True)
    rewards = problem.step_reward(x_t, actions, step, cond)
    log_ratio = torch.stack([reference.log_prob(a) - proposal.log_prob(a) for a in actions])
    weights = target_weights(rewards, beta, log_ratio)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 8), rtol=0, atol=2e-3)
    # without the curvature (the linearised proposal) the weights are far from uniform
    linear = linearised_proposal(reference, gradient, beta, 1.0)
    actions = linear.sample(generator, num=8, antithetic=True)
    log_ratio = torch.stack([reference.log_prob(a) - linear.log_prob(a) for a in actions])
    flat = target_weights(problem.step_reward(x_t, actions, step, cond), beta, log_ratio)
    assert float(flat.max()) > 0.5


def test_a_latent_base_model_trains_and_is_scored_on_latents(tiny_config, pretrained_home):
    from training.base_model import train_base_model

    config = quadratic_config(tiny_config, iterations=3)
    config = config.model_copy(update={"objectives": config.objectives + []})
    result = train_base_model(config, "latent_blank", pretrained_home, progress=False)
    assert math.isfinite(result.reward_before) and math.isfinite(result.reward_after)
    assert result.reward_before < 0  # a latent distance, not an image reward
    with pytest.raises(ValueError, match="curvature_proposal refines"):
        tiny_config.train.model_copy(update={"curvature_proposal": True}).model_validate(
            {**tiny_config.train.model_dump(), "curvature_proposal": True}
        )
