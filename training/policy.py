"""The Gaussian step policy: one DDIM (``eta > 0``) reverse step as a diagonal Gaussian (DESIGN section 2).

The same interface serves the trainer, the MSDDA composer and every baseline, for a diffusers UNet (with
classifier-free guidance) and for a small MLP on 2-D toy data alike: anything that maps ``(x_t, t, cond)`` to an
epsilon-prediction is an :data:`EpsilonModel`.

DDIM step (Song et al., 2021, eq. 12), with ``a_t = alphas_cumprod[t]`` and ``a_p = alphas_cumprod[t_prev]``:

    x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_p) / (1 - a_t)) * sqrt(1 - a_t / a_p)
    mean    = sqrt(a_p) * x0_hat + sqrt(1 - a_p - sigma_t^2) * eps
    x_prev ~ N(mean, sigma_t^2 * exp(v[t]))          (v: optional learned log-variance offset, 0 at start)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

EpsilonModel = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
"""``eps_model(x_t, t, cond) -> eps`` with ``t`` a 1-D tensor of timesteps (one per row)."""


# ----------------------------------------------------------------------------------------- pure DDIM maths


def ddim_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """``x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)``, the Tweedie/DDIM clean estimate."""
    return (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()


def ddim_sigma(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """``sigma_t = eta * sqrt((1 - a_p) / (1 - a_t)) * sqrt(1 - a_t / a_p)``."""
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def ddim_mean(x_t: torch.Tensor, eps: torch.Tensor, alpha_t, alpha_prev, sigma) -> torch.Tensor:
    """``mean = sqrt(a_p) * x0_hat + sqrt(1 - a_p - sigma^2) * eps``; affine in ``eps``."""
    direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt()
    return alpha_prev.sqrt() * ddim_x0(x_t, eps, alpha_t) + direction * eps


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, diag(variance))`` summed over all but the first (batch) dimension."""
    variance = variance.expand_as(mean)
    elementwise = -0.5 * ((x - mean) ** 2 / variance + variance.log() + math.log(2 * math.pi))
    return elementwise.flatten(1).sum(1)


def gaussian_kl(mean_p, var_p, mean_q, var_q) -> torch.Tensor:
    """``KL(N(mean_p, var_p) || N(mean_q, var_q))`` for diagonal Gaussians, summed over non-batch dims:
    ``0.5 * sum(log(var_q / var_p) + (var_p + (mean_p - mean_q)^2) / var_q - 1)``."""
    var_p, var_q = var_p.expand_as(mean_p), var_q.expand_as(mean_p)
    elementwise = 0.5 * ((var_q / var_p).log() + (var_p + (mean_p - mean_q) ** 2) / var_q - 1)
    return elementwise.flatten(1).sum(1)


# --------------------------------------------------------------------------------------- the step schedule


@dataclass(frozen=True)
class DDIMSchedule:
    """The discretised reverse chain: ``timesteps[i]`` -> ``prev_timesteps[i]``, with their alphas and sigmas."""

    timesteps: torch.Tensor  # [S] int64, descending
    alpha: torch.Tensor  # [S] a_t
    alpha_prev: torch.Tensor  # [S] a_p
    sigma: torch.Tensor  # [S] sigma_t (before any learned offset)
    eta: float

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, eta: float) -> DDIMSchedule:
        """Match ``diffusers.DDIMScheduler.set_timesteps`` (incl. ``steps_offset`` and ``set_alpha_to_one``)."""
        if eta <= 0:
            raise ValueError(f"eta must be > 0 for a Gaussian step policy, got {eta}")
        config = scheduler.config
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.to(torch.int64)
        ratio = config.num_train_timesteps // num_inference_steps
        prev = timesteps - ratio
        alphas = scheduler.alphas_cumprod.to(torch.float64)
        final = torch.tensor(1.0 if config.get("set_alpha_to_one", True) else float(alphas[0]), dtype=torch.float64)
        alpha = alphas[timesteps]
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
        sigma = ddim_sigma(alpha, alpha_prev, eta)
        return cls(timesteps, alpha.float(), alpha_prev.float(), sigma.float(), eta)

    def __len__(self) -> int:
        return len(self.timesteps)


class LogVarianceOffset(nn.Module):
    """Learned ``v[step]`` (shape ``[S, 1]``) or ``v[step, channel]`` (``[S, C]``), initialised at 0."""

    def __init__(self, num_steps: int, channels: int = 1):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(num_steps, channels))

    def forward(self, step: int, ndim: int) -> torch.Tensor:
        """Offsets broadcastable to ``[B, C, ...]`` (``ndim`` dims in all)."""
        v = self.values[step]
        return v.view(1, -1, *([1] * (ndim - 2))) if v.numel() > 1 else v.view(*([1] * ndim))


# ------------------------------------------------------------------------------------------------ the policy


class GaussianStepPolicy(nn.Module):
    """``pi(x_prev | x_t, c) = N(mean(eps_model), sigma_t^2 * exp(v[t]))`` over a :class:`DDIMSchedule`.

    ``eps_model`` already includes classifier-free guidance where the model has it (see ``cfg_epsilon``).
    """

    def __init__(self, eps_model: EpsilonModel, schedule: DDIMSchedule, log_variance: LogVarianceOffset | None):
        super().__init__()
        self.eps_model = eps_model
        self.schedule = schedule
        self.log_variance = log_variance

    def _coefficients(self, step: int, like: torch.Tensor):
        s = self.schedule
        return (s.alpha[step].to(like), s.alpha_prev[step].to(like), s.sigma[step].to(like))

    def epsilon(self, x_t: torch.Tensor, step: int, cond) -> torch.Tensor:
        t = self.schedule.timesteps[step].expand(x_t.shape[0])
        return self.eps_model(x_t, t, cond)

    def mean_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        alpha, alpha_prev, sigma = self._coefficients(step, x_t)
        return ddim_mean(x_t, eps, alpha, alpha_prev, sigma)

    def variance(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """``sigma_t^2 * exp(v[t])``, broadcastable to ``like``."""
        base = self.schedule.sigma[step].to(like) ** 2
        if self.log_variance is None:
            return base.view(*([1] * like.dim()))
        return base * self.log_variance(step, like.dim()).exp()

    def forward(self, x_t: torch.Tensor, step: int, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, variance)`` of the step kernel at state ``(cond, t_step, x_t)``."""
        return self.mean_from_eps(x_t, self.epsilon(x_t, step, cond), step), self.variance(step, x_t)

    def sample(self, x_t, step: int, cond, generator: torch.Generator | None = None, mean_var=None):
        mean, var = mean_var if mean_var is not None else self(x_t, step, cond)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)  # CPU generator
        return mean + var.sqrt() * noise

    def log_prob(self, x_prev, x_t, step: int, cond, mean_var=None) -> torch.Tensor:
        mean, var = mean_var if mean_var is not None else self(x_t, step, cond)
        return gaussian_log_prob(x_prev, mean, var)


def cfg_epsilon(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``eps_u + g * (eps_c - eps_u)``."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
