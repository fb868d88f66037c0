"""The held-out kernel check watched while training (training/step/kernel_check.py), on the analytic toy."""

import math

import pytest
import torch

from configs import TrainConfig
from training.analysis.toy import ToyProblem
from training.step.kernel_check import CHECK_SEED_OFFSET, KernelCheck
from training.trainer import train

FAST = {"beta": 1.0, "batch_size": 128, "states_per_trajectory": 10, "num_actions": 32, "learning_rate": 3e-3}


class MonteCarloToy(ToyProblem):
    """The toy with its closed form hidden: the check must estimate the optimum from weighted actions."""

    def exact_step_optimum(self, x_t, step, cond, beta):
        return None


class NaNRewardToy(MonteCarloToy):
    def step_reward(self, x_t, actions, step, cond):
        rewards = super().step_reward(x_t, actions, step, cond)
        return torch.full_like(rewards, float("nan")) if step == 3 else rewards


def _check(problem, actions: int = 4096) -> KernelCheck:
    return KernelCheck.build(problem, chains=64, actions=actions, beta=1.0, seed=0)


def test_a_policy_at_the_reference_has_error_one_and_the_optimum_zero():
    torch.manual_seed(0)
    problem = ToyProblem(num_inference_steps=5)
    check = _check(problem)
    assert check.exact and check.missing is None
    assert check(problem)["kernel_error"] == pytest.approx(1.0, abs=1e-6)  # the residual starts at zero

    class AtTheOptimum:  # a policy that is pi* itself
        unet_evaluations = 0

        def policy(self, x, step, cond):
            return problem.exact_step_optimum(x, step, cond, 1.0)

    figures = check(AtTheOptimum())
    assert figures["kernel_error"] < 1e-5 and figures["kernel_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_the_monte_carlo_check_agrees_with_the_exact_one():
    torch.manual_seed(0)
    problem = ToyProblem(num_inference_steps=5)
    train(problem, TrainConfig(iterations=20, eval_every=0, **FAST), progress=False)
    monte_carlo = MonteCarloToy(num_inference_steps=5)
    monte_carlo.load_trainable_state(problem.trainable_state())
    exact, estimated = _check(problem)(problem), _check(monte_carlo)(monte_carlo)
    assert not _check(monte_carlo).exact
    assert 0.05 < exact["kernel_error"] < 0.95, "the test needs a policy between the reference and pi*"
    assert estimated["kernel_error"] == pytest.approx(exact["kernel_error"], abs=0.03)
    assert estimated["kernel_cosine"] == pytest.approx(exact["kernel_cosine"], abs=0.03)


class TurncoatToy(ToyProblem):
    """Its reward turns against the optimum after 5 iterations (10 step rewards each): training first
    approaches pi*, then leaves it, so the best checked weights are not the last."""

    calls, flip = 0, 50

    def step_reward(self, x_t, actions, step, cond):
        self.calls += 1
        rewards = super().step_reward(x_t, actions, step, cond)
        return -rewards if self.calls > self.flip else rewards


def test_training_logs_the_check_and_keeps_the_best_checked_weights():
    torch.manual_seed(0)
    problem = TurncoatToy(num_inference_steps=5)
    config = TrainConfig(iterations=20, eval_every=5, kernel_check_chains=64, **FAST)
    result = train(problem, config, progress=False)
    checked = [m for m in result.history if math.isfinite(m.kernel_error)]
    assert [m.iteration for m in checked] == [5, 10, 15, 20]
    best = min(checked, key=lambda m: m.kernel_error)
    assert best.iteration < 20 and best.kernel_error < checked[-1].kernel_error
    assert result.kernel_check["iteration"] == best.iteration
    assert result.kernel_check["kernel_error"] == best.kernel_error
    assert result.kernel_check["exact"] is True and result.kernel_check["missing"] is None
    again = KernelCheck.build(problem, 64, 64, 1.0, config.eval_seed + CHECK_SEED_OFFSET)(problem)
    kept = again["kernel_error"]
    assert kept == pytest.approx(best.kernel_error, abs=1e-6), "the weights kept are the best"


def test_a_check_that_cannot_run_is_missing_and_training_goes_on(capsys):
    problem = NaNRewardToy(num_inference_steps=5)
    config = TrainConfig(iterations=4, eval_every=2, kernel_check_actions=8, **{**FAST, "batch_size": 16})
    result = train(problem, config, progress=False)
    assert "the kernel check is missing (the reward is not finite" in capsys.readouterr().err
    missing = result.kernel_check["missing"]
    assert missing.startswith("the reward is not finite at a held-out action of step 3")
    assert math.isnan(result.kernel_check["kernel_error"]) and result.kernel_check["iteration"] is None
    assert all(math.isnan(m.kernel_error) for m in result.history)
