"""An analytic toy for the trainer: 2-D Gaussian-mixture data with the exact reference epsilon.

With step reward ``r(s, a) = b·a - c |a|^2 / 2`` the step-level optimum is Gaussian in closed form:

    pi*(a|s) = N(m*, v*),   1 / v* = 1 / sigma_t^2 + c / beta,   m* = v* (mu_ref / sigma_t^2 + b / beta)

so the trainer's policy can be compared to ``pi*`` state by state. The trainable part is a small MLP added to
the exact reference epsilon (the toy's LoRA), initialised at zero, plus the per-step log-variance offset.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.step.kernel import DDIMSchedule, GaussianStep, LogVarianceOffset, draw_noise
from training.step.policy import GaussianStepPolicy

MIXTURE_MEANS = ((-2.0, 0.0), (2.0, 0.0), (0.0, 2.0))
MIXTURE_STD = 0.5


def make_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


class MixtureEpsilon(nn.Module):
    """Exact ``eps(x_t, t) = -sqrt(1 - a_t) * grad log p_t(x_t)`` for the Gaussian mixture data."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("means", torch.tensor(MIXTURE_MEANS))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1)
        var = a * MIXTURE_STD**2 + (1 - a)
        centres = a.sqrt().unsqueeze(1) * self.means.unsqueeze(0)  # [B, K, 2]
        diff = centres - x.unsqueeze(1)
        logits = -(diff**2).sum(-1) / (2 * var)
        resp = torch.softmax(logits, dim=1).unsqueeze(-1)
        score = (resp * diff).sum(1) / var
        return -(1 - a).sqrt() * score


class ResidualEpsilon(nn.Module):
    """``eps_ref(x, t) + MLP(x, t)``, the MLP's last layer zero-initialised."""

    def __init__(self, reference: MixtureEpsilon, hidden: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        self.reference = reference
        self.num_train_timesteps = num_train_timesteps
        self.net = nn.Sequential(
            nn.Linear(2 + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, cond=None):
        freqs = torch.arange(1, 5, dtype=x.dtype, device=x.device) * math.pi
        phase = (t.to(x.dtype) / self.num_train_timesteps).view(-1, 1) * freqs
        features = torch.cat([x, phase.sin(), phase.cos()], dim=1)
        with torch.no_grad():
            base = self.reference(x, t)
        return base + self.net(features)


class ToyProblem(nn.Module):
    """The :class:`training.trainer.StepProblem` for the toy."""

    def __init__(
        self,
        num_inference_steps: int = 10,
        eta: float = 1.0,
        linear=(1.0, -0.5),
        quadratic: float = 1.0,
        learn_variance: bool = True,
    ):
        super().__init__()
        scheduler = make_scheduler()
        self.schedule = DDIMSchedule.from_scheduler(scheduler, num_inference_steps, eta)
        self.reference_eps = MixtureEpsilon(scheduler.alphas_cumprod)
        log_variance = LogVarianceOffset(num_inference_steps) if learn_variance else None
        self.policy = GaussianStepPolicy(ResidualEpsilon(self.reference_eps), self.schedule, log_variance)
        self.reference_policy = GaussianStepPolicy(self.reference_eps, self.schedule, None)
        self.register_buffer("linear", torch.tensor(linear))
        self.quadratic = quadratic
        self._evaluations = 0

    @property
    def unet_evaluations(self) -> int:
        return self._evaluations

    @unet_evaluations.setter
    def unet_evaluations(self, value: int) -> None:
        self._evaluations = value

    def count_reward_gradient(self, states: int, step: int) -> None:
        """The toy's reward is a closed form of the action: its gradient runs no epsilon model."""

    def initial_states(self, batch_size: int, generator: torch.Generator):
        return draw_noise((batch_size, 2), generator, device=self.linear.device), None

    def reference(self, x_t, step, cond) -> GaussianStep:
        return self.reference_policy(x_t, step, cond)

    def step_reward(self, x_t, actions, step, cond):
        return actions @ self.linear - 0.5 * self.quadratic * (actions**2).sum(-1)

    def optimum(self, x_t: torch.Tensor, step: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The analytic ``pi*`` (mean, variance) at states ``x_t``."""
        reference = self.reference(x_t, step, None)
        precision = 1 / reference.variance + self.quadratic / beta
        return (reference.mean / reference.variance + self.linear / beta) / precision, 1 / precision

    def exact_step_optimum(self, x_t, step: int, cond, beta: float) -> GaussianStep:
        return GaussianStep(*self.optimum(x_t, step, beta))

    def trainable_state(self):
        return {k: v for k, v in self.policy.state_dict().items() if not k.startswith("eps_model.reference")}

    def load_trainable_state(self, state):
        self.policy.load_state_dict(state, strict=False)


@torch.no_grad()
def evaluate_against_optimum(
    problem: ToyProblem, beta: float, num_states: int = 2000, seed: int = 1234
) -> dict:
    """Held-out states from reference rollouts: mean error over ``sigma_t`` and relative variance error."""
    generator = torch.Generator().manual_seed(seed)
    x = draw_noise((num_states, 2), generator)
    mean_errors, var_errors, per_step = [], [], []
    for step in range(len(problem.schedule)):
        policy = problem.policy(x, step, None)
        mean, var = policy.mean, policy.variance
        target_mean, target_var = problem.optimum(x, step, beta)
        sigma = problem.schedule.sigma[step]
        mean_error = ((mean - target_mean).norm(dim=-1) / sigma).mean().item()
        var_error = ((var.expand_as(target_var) / target_var) - 1).abs().mean().item()
        mean_errors.append(mean_error)
        var_errors.append(var_error)
        per_step.append({"step": step, "mean_error_over_sigma": mean_error, "variance_rel_error": var_error})
        x = problem.reference(x, step, None).sample(generator)
    return {
        "mean_error_over_sigma": sum(mean_errors) / len(mean_errors),
        "variance_rel_error": sum(var_errors) / len(var_errors),
        "max_mean_error_over_sigma": max(mean_errors),
        "max_variance_rel_error": max(var_errors),
        "per_step": per_step,
    }
