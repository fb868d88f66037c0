"""The step-level trainer: reaches pi* on the analytic toy, resumes exactly, survives NaN rewards."""

import pytest
import torch

from configs import TrainConfig
from training.analysis.toy import ToyProblem, evaluate_against_optimum
from training.step.kernel import GaussianStep
from training.trainer import (
    learning_rate_factor,
    linearised_proposal,
    step_reward_gradient,
    target_matching_loss,
    target_weights,
    train,
)

FAST = {"beta": 1.0, "batch_size": 128, "states_per_trajectory": 10, "num_actions": 32, "learning_rate": 3e-3}


@pytest.mark.parametrize("method", ["target_matching", "policy_gradient"])
def test_toy_policy_reaches_the_analytic_optimum(method):
    problem = ToyProblem(num_inference_steps=10)
    before = evaluate_against_optimum(problem, beta=1.0, num_states=500)
    train(problem, TrainConfig(method=method, iterations=150, **FAST), progress=False)
    after = evaluate_against_optimum(problem, beta=1.0, num_states=500)
    assert before["mean_error_over_sigma"] > 0.3, "the test starts far from pi*"
    assert after["mean_error_over_sigma"] <= 0.1, after
    assert after["variance_rel_error"] <= 0.1, after


def test_antithetic_target_matching_reaches_the_analytic_optimum():
    problem = ToyProblem(num_inference_steps=10)
    train(problem, TrainConfig(iterations=150, antithetic=True, **FAST), progress=False)
    after = evaluate_against_optimum(problem, beta=1.0, num_states=500)
    assert after["mean_error_over_sigma"] <= 0.1, after
    assert after["variance_rel_error"] <= 0.1, after


def test_regression_target_loss_reaches_the_analytic_optimum():
    problem = ToyProblem(num_inference_steps=10)
    train(problem, TrainConfig(iterations=150, target_loss="regression", **FAST), progress=False)
    after = evaluate_against_optimum(problem, beta=1.0, num_states=500)
    assert after["mean_error_over_sigma"] <= 0.1, after
    assert after["variance_rel_error"] <= 0.1, after


@pytest.mark.parametrize("states", ["reference_pool", "mixed"])
def test_pooled_states_reach_the_analytic_optimum(states):
    problem = ToyProblem(num_inference_steps=10)
    config = TrainConfig(iterations=150, states=states, pool_batches=4, **FAST)
    train(problem, config, progress=False)
    after = evaluate_against_optimum(problem, beta=1.0, num_states=500)
    assert after["mean_error_over_sigma"] <= 0.1, after
    assert after["variance_rel_error"] <= 0.1, after


def test_regression_weighs_a_mean_error_by_the_reference_variance_not_the_learned_one():
    """Likelihood: the mean's gradient is ``(mu - sum w a) / sigma_theta^2``; regression: ``/ sigma_t^2``,
    whatever the learned variance; both fit the same variance."""
    generator = torch.Generator().manual_seed(0)
    actions = torch.randn(6, 3, 2, generator=generator)
    weights = torch.softmax(torch.randn(6, 3, generator=generator), 0)
    reference = GaussianStep(torch.zeros(3, 2), torch.full((1, 1), 0.5))
    target = (weights.unsqueeze(-1) * actions).sum(0)
    for regress, variance in ((False, 0.02), (True, 0.5)):
        mean = torch.ones(3, 2, requires_grad=True)
        log_variance = torch.tensor(-4.0, requires_grad=True)  # sigma_theta^2 = e^-4, 25x narrower
        policy = GaussianStep(mean, log_variance.exp().expand(3, 2))
        target_matching_loss(policy, actions, weights, reference if regress else None).backward()
        expected = (mean.detach() - target) / (variance if regress else log_variance.exp().item())
        torch.testing.assert_close(mean.grad * 3 * 2, expected, rtol=1e-4, atol=1e-5)
        if not regress:
            likelihood_variance_gradient = log_variance.grad.clone()
    torch.testing.assert_close(log_variance.grad, likelihood_variance_gradient)


def test_target_loss_is_a_target_matching_option():
    with pytest.raises(ValueError, match="target_loss"):
        TrainConfig(method="policy_gradient", target_loss="regression")


def _target_mean(problem, x, step, beta, kappa, num, generator, antithetic=False):
    """The target-matching target's mean at states ``x``, with actions from the (shifted) reference."""
    reference = problem.reference(x, step, None)
    gradient = step_reward_gradient(problem, x, reference.mean, step, None)
    proposal = linearised_proposal(reference, gradient, beta, kappa)
    actions = proposal.sample(generator, num=num, antithetic=antithetic)
    log_ratio = torch.stack([reference.log_prob(a) - proposal.log_prob(a) for a in actions])
    weights = target_weights(problem.step_reward(x, actions, step, None), beta, log_ratio)
    return (weights.unsqueeze(-1) * actions).sum(0), weights


def test_linearised_proposal_makes_a_linear_rewards_target_exact():
    problem, beta, step = ToyProblem(quadratic=0.0), 0.5, 3
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    reference = problem.reference(x, step, None)
    gradient = step_reward_gradient(problem, x, reference.mean, step, None)
    torch.testing.assert_close(gradient, problem.linear.expand_as(x))
    mean, weights = _target_mean(problem, x, step, beta, 1.0, 2, torch.Generator().manual_seed(1), True)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))  # nothing left to tilt
    torch.testing.assert_close(mean, problem.optimum(x, step, beta)[0])  # two actions, no noise


def test_gradient_proposal_keeps_the_target_and_shrinks_its_noise():
    """A curved reward: the shifted proposal still targets pi* (many actions), and with a few antithetic
    actions its target is closer to pi*'s mean than the plain reference's."""
    problem, beta, step = ToyProblem(quadratic=0.3), 1.0, 5
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    optimum = problem.optimum(x, step, beta)[0]
    sigma = problem.schedule.sigma[step]
    many, _ = _target_mean(problem, x, step, beta, 0.5, 20000, torch.Generator().manual_seed(1))
    assert ((many - optimum).norm(dim=-1) / sigma).mean() < 0.03

    def error(kappa):
        generator = torch.Generator().manual_seed(2)
        mean, _ = _target_mean(problem, x, step, beta, kappa, 8, generator, antithetic=True)
        return ((mean - optimum).norm(dim=-1) / sigma).pow(2).mean().item()

    plain, shifted = error(0.0), error(1.0)
    assert shifted < 0.25 * plain, (plain, shifted)


def test_gradient_proposal_target_matching_reaches_the_analytic_optimum():
    problem = ToyProblem(num_inference_steps=10)
    config = TrainConfig(iterations=150, gradient_proposal=1.0, **FAST)
    train(problem, config, progress=False)
    after = evaluate_against_optimum(problem, beta=1.0, num_states=500)
    assert after["mean_error_over_sigma"] <= 0.1, after
    assert after["variance_rel_error"] <= 0.1, after


def test_gradient_proposal_is_a_target_matching_option():
    with pytest.raises(ValueError, match="gradient_proposal"):
        TrainConfig(method="policy_gradient", gradient_proposal=0.5)


def _toy(seed: int, **kwargs) -> ToyProblem:
    """A toy whose initial weights (the MLP's random layers) come from ``seed``, not from whatever state the
    global RNG was left in."""
    torch.manual_seed(seed)
    return ToyProblem(**kwargs)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"learning_rate_schedule": "cosine"},
        {"states": "mixed", "pool_batches": 3},
        {"eval_every": 2, "kernel_check_chains": 4},
    ],
    ids=["constant", "cosine", "mixed", "kernel_check"],
)
def test_killed_training_resumes_exactly(tmp_path, settings):
    config = TrainConfig(iterations=6, checkpoint_every=3, seed=0, **{**FAST, "batch_size": 16, **settings})
    straight = _toy(0, num_inference_steps=5)
    expected = train(straight, config, progress=False)

    resumed = _toy(0, num_inference_steps=5)  # the same start as `straight`
    train(resumed, config, checkpoint_dir=tmp_path / "ckpt", progress=False, stop_after=4)  # "killed" at 4
    torch.manual_seed(12345)  # a new process: nothing in memory, the global RNG elsewhere
    fresh = _toy(1, num_inference_steps=5)  # other initial weights: the checkpoint must restore them
    assert not torch.equal(fresh.policy.eps_model.net[0].weight, straight.policy.eps_model.net[0].weight)
    result = train(fresh, config, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert [m.iteration for m in result.history] == [1, 2, 3, 4, 5, 6]
    assert [m.loss for m in result.history] == [m.loss for m in expected.history]
    assert result.kernel_check == expected.kernel_check  # the best checked weights survive the kill
    for key, value in straight.trainable_state().items():
        torch.testing.assert_close(fresh.trainable_state()[key], value, rtol=0, atol=0)


def test_cosine_schedule_decays_the_learning_rate_to_zero():
    config = TrainConfig(iterations=10, learning_rate_schedule="cosine")
    factors = [learning_rate_factor(config, i) for i in range(10)]
    assert factors[0] == 1.0 and factors[5] == pytest.approx(0.5) and 0 < factors[-1] < 0.03
    assert factors == sorted(factors, reverse=True)
    assert learning_rate_factor(TrainConfig(iterations=10), 9) == 1.0
    runs = {}
    for schedule in ("constant", "cosine"):
        config = TrainConfig(
            iterations=3, seed=0, learning_rate_schedule=schedule, **{**FAST, "batch_size": 16}
        )
        runs[schedule] = [
            m.loss for m in train(_toy(0, num_inference_steps=5), config, progress=False).history
        ]
    assert runs["constant"][:2] == runs["cosine"][:2]  # the first update is at the full rate in both
    assert runs["constant"][2] != runs["cosine"][2]


class FlakyRewardToy(ToyProblem):
    """Returns NaN rewards on the second call (a broken reward model)."""

    calls = 0

    def step_reward(self, x_t, actions, step, cond):
        self.calls += 1
        rewards = super().step_reward(x_t, actions, step, cond)
        return torch.full_like(rewards, float("nan")) if self.calls == 2 else rewards


def test_nan_rewards_skip_the_batch_with_a_warning():
    problem = FlakyRewardToy(num_inference_steps=5)
    config = TrainConfig(iterations=3, **{**FAST, "batch_size": 8, "states_per_trajectory": 1})
    snapshots = []
    with pytest.warns(RuntimeWarning, match="non-finite rewards"):
        result = train(
            problem,
            config,
            progress=False,
            log_metrics=lambda m: snapshots.append(
                {k: v.clone() for k, v in problem.trainable_state().items()}
            ),
        )
    assert [m.skipped for m in result.history] == [False, True, False]
    for key in snapshots[0]:
        torch.testing.assert_close(snapshots[1][key], snapshots[0][key], rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in problem.trainable_state().values())


def test_bf16_and_gradient_accumulation_run():
    problem = ToyProblem(num_inference_steps=5)
    config = TrainConfig(
        iterations=4, mixed_precision="bf16", gradient_accumulation_steps=2, **{**FAST, "batch_size": 16}
    )
    result = train(problem, config, progress=False)
    assert len(result.history) == 4 and not any(m.skipped for m in result.history)
    assert all(torch.isfinite(v).all() for v in problem.trainable_state().values())
    assert problem.policy.eps_model.net[-1].weight.abs().sum() > 0, "optimizer stepped"
