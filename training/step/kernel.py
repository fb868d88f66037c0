"""One reverse step as a diagonal Gaussian kernel (docs/design.md §1).

DDIM step (Song et al., 2021, eq. 12), with ``a_t = alphas_cumprod[t]`` and ``a_p = alphas_cumprod[t_prev]``:

    x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_p) / (1 - a_t)) * sqrt(1 - a_t / a_p)
    mean    = sqrt(a_p) * x0_hat + sqrt(1 - a_p - sigma_t^2) * eps
    x_prev ~ N(mean, sigma_t^2 * exp(v[t]))          (v: optional learned log-variance offset, 0 at start)

Everything here is pure maths on tensors, computed on the device and in the dtype of its inputs. Noise is
drawn in one place, :func:`draw_noise`: from a CPU generator, then moved, so a seed gives the same chain on
any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

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


def draw_noise(
    shape, generator: torch.Generator | None, like: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn from a CPU ``generator``, then moved: in ``like``'s dtype and
    on its device, or in float32 on ``device`` (default: the CPU). The one place noise is drawn."""
    dtype = like.dtype if like is not None else torch.float32
    noise = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    target = like.device if like is not None else device
    return noise if target is None else noise.to(target)


def offset_variance(sigma: torch.Tensor, log_offset: torch.Tensor | None, ndim: int) -> torch.Tensor:
    """``sigma_t^2 * exp(v)`` broadcastable to ``ndim`` dims: ``v`` is ``None`` (the plain DDIM variance), one
    value, or one value per channel (dimension 1)."""
    base = sigma**2
    if log_offset is None:
        return base.view(*([1] * ndim))
    v = log_offset.to(base)
    shape = (1, -1, *([1] * (ndim - 2))) if v.numel() > 1 else (1,) * ndim
    return base * v.reshape(shape).exp()


# --------------------------------------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class GaussianStep:
    """``N(mean, diag(variance))``: one reverse step's kernel; ``variance`` broadcasts to ``mean``.

    ``info`` carries per-step diagnostics (floats) that the chain runner records.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def std(self) -> torch.Tensor:
        return self.variance.sqrt()

    def sample(
        self, generator: torch.Generator | None, num: int | None = None, antithetic: bool = False
    ) -> torch.Tensor:
        """``mean + std * z``; with ``num``, ``num`` draws stacked in a new first dimension: independent, or
        with ``antithetic`` in pairs ``mean ± std * z`` (rows ``2p`` and ``2p + 1``; ``num`` even), whose
        noises sum to exactly zero."""
        if num is None:
            return self.mean + self.std * draw_noise(self.mean.shape, generator, self.mean)
        if antithetic:
            if num % 2:
                raise ValueError(f"antithetic sampling needs an even number of draws, got {num}")
            half = draw_noise((num // 2, *self.mean.shape), generator, self.mean)
            noise = torch.stack([half, -half], dim=1).flatten(0, 1)
        else:
            noise = draw_noise((num, *self.mean.shape), generator, self.mean)
        return self.mean.unsqueeze(0) + self.std.unsqueeze(0) * noise

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; mean, variance)`` per batch row."""
        return gaussian_log_prob(x, self.mean, self.variance)

    def kl(self, other: GaussianStep) -> torch.Tensor:
        """``KL(self || other)`` per batch row."""
        return gaussian_kl(self.mean, self.variance, other.mean, other.variance)

    def detach(self) -> GaussianStep:
        return GaussianStep(self.mean.detach(), self.variance.detach(), self.info)

    def float(self) -> GaussianStep:
        return GaussianStep(self.mean.float(), self.variance.float(), self.info)


def tilted_gaussian(reference: GaussianStep, target: torch.Tensor, precision) -> GaussianStep:
    """``N(mu, var) * exp(-k/2 |a - a_c|^2)`` normalised: the Gaussian with precision ``1/var + k`` and mean
    ``(mu / var + k a_c) / (1 / var + k)`` (``k = precision``, a scalar or per-row tensor broadcastable to
    the mean). A deterministic step (``var = 0``, DDIM's last) stays as it is."""
    if not bool((reference.variance > 0).all()):
        return reference
    variance = 1 / (1 / reference.variance + precision)
    return GaussianStep(variance * (reference.mean / reference.variance + precision * target), variance)


# --------------------------------------------------------------------------------------- the step schedule


@dataclass(frozen=True)
class DDIMSchedule:
    """The discretised reverse chain: ``timesteps[i]`` -> ``prev_timesteps[i]``, with their alphas and
    sigmas."""

    timesteps: torch.Tensor  # [S] int64, descending
    alpha: torch.Tensor  # [S] a_t
    alpha_prev: torch.Tensor  # [S] a_p
    sigma: torch.Tensor  # [S] sigma_t (before any learned offset)
    eta: float

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, eta: float) -> DDIMSchedule:
        """Match ``diffusers.DDIMScheduler.set_timesteps`` (incl. ``steps_offset`` and
        ``set_alpha_to_one``)."""
        if eta <= 0:
            raise ValueError(f"eta must be > 0 for a Gaussian step policy, got {eta}")
        config = scheduler.config
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.to(torch.int64)
        ratio = config.num_train_timesteps // num_inference_steps
        prev = timesteps - ratio
        alphas = scheduler.alphas_cumprod.to(torch.float64)
        final_alpha = 1.0 if config.get("set_alpha_to_one", True) else float(alphas[0])
        final = torch.tensor(final_alpha, dtype=torch.float64)
        alpha = alphas[timesteps]
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
        sigma = ddim_sigma(alpha, alpha_prev, eta)
        return cls(timesteps, alpha.float(), alpha_prev.float(), sigma.float(), eta)

    def __len__(self) -> int:
        return len(self.timesteps)

    def coefficients(self, step: int, like: torch.Tensor):
        """``(a_t, a_p, sigma_t)`` of ``step`` in ``like``'s dtype and on its device."""
        return self.alpha[step].to(like), self.alpha_prev[step].to(like), self.sigma[step].to(like)

    def timestep(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """``t`` of ``step``, one per batch row of ``like``, on its device."""
        return self.timesteps[step].expand(like.shape[0]).to(like.device)

    def variance(self, step: int, like: torch.Tensor, log_offset: torch.Tensor | None = None) -> torch.Tensor:
        """``sigma_t^2 * exp(log_offset[step])`` broadcastable to ``like``; ``log_offset`` is ``[S, 1]``,
        ``[S, C]`` or ``None``."""
        offset = None if log_offset is None else log_offset[step]
        return offset_variance(self.sigma[step].to(like), offset, like.dim())

    def kernel(
        self, x_t: torch.Tensor, eps: torch.Tensor, step: int, log_offset: torch.Tensor | None = None, **info
    ) -> GaussianStep:
        """The DDIM kernel ``N(ddim_mean(x_t, eps), sigma_t^2 exp(v))`` of ``step`` for an epsilon ``eps``."""
        alpha, alpha_prev, sigma = self.coefficients(step, x_t)
        return GaussianStep(
            ddim_mean(x_t, eps, alpha, alpha_prev, sigma), self.variance(step, x_t, log_offset), info
        )

    def clean_estimate(
        self, x: torch.Tensor, eps: torch.Tensor, step: int, after: bool = False
    ) -> torch.Tensor:
        """``x0_hat`` of ``x`` at ``step``'s time (``after``: at the time it steps to, ``t_prev``)."""
        alpha = (self.alpha_prev if after else self.alpha)[step].to(x)
        return ddim_x0(x, eps, alpha)


class LogVarianceOffset(nn.Module):
    """Learned ``v[step]`` (shape ``[S, 1]``) or ``v[step, channel]`` (``[S, C]``), initialised at 0."""

    def __init__(self, num_steps: int, channels: int = 1):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(num_steps, channels))
