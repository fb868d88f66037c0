"""The MSDDA sampler: a DDIM (``eta > 0``) loop whose every step is the closed-form product of the base models'
Gaussian kernels (``composition.msdda.compose_gaussian``), with all K adapters (and the reference when
``sum lam != 1``) evaluated in one batched UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from composition.batched import REFERENCE, mixed_adapter_batch, routing
from composition.msdda import SUM_TOLERANCE, compose_gaussian, composition_coefficients
from training.policy import DDIMSchedule, cfg_epsilon, ddim_mean


@dataclass(frozen=True)
class BaseKernel:
    """A loaded base model: its adapter name in the UNet, learned log-variance offset and training beta."""

    name: str
    log_variance: torch.Tensor | None  # [S, 1] or [S, C]
    beta: float


@dataclass
class SampleResult:
    latents: torch.Tensor
    nfe_per_image: float
    diagnostics: list[dict] = field(default_factory=list)


class MSDDASampler:
    def __init__(self, unet, schedule: DDIMSchedule, guidance_scale: float, kernels: Sequence[BaseKernel]):
        self.unet, self.schedule, self.guidance_scale = unet, schedule, guidance_scale
        self.kernels = list(kernels)

    def _variance(self, kernel: BaseKernel | None, step: int, like: torch.Tensor) -> torch.Tensor:
        base = self.schedule.sigma[step].to(like) ** 2
        if kernel is None or kernel.log_variance is None:
            return base.view(*([1] * like.dim()))
        v = kernel.log_variance[step].to(like)
        shape = (1, -1, *([1] * (like.dim() - 2))) if v.numel() > 1 else (1,) * like.dim()
        return base * v.view(shape).exp()

    @torch.no_grad()
    def epsilons(self, x: torch.Tensor, step: int, embeds, uncond, names: list[str]) -> torch.Tensor:
        """``[len(names), B, ...]`` guided epsilons from one UNet call routed by adapter name."""
        n, b = len(names), x.shape[0]
        xs = x.repeat(n, *([1] * (x.dim() - 1)))
        t = self.schedule.timesteps[step].expand(n * b).to(x.device)
        context = embeds.repeat(n, 1, 1)
        with mixed_adapter_batch(self.unet, routing(names, b)):
            if self.guidance_scale == 1.0:
                eps = self.unet(xs, t, encoder_hidden_states=context).sample
            else:
                out = self.unet(torch.cat([xs, xs]), torch.cat([t, t]),
                                encoder_hidden_states=torch.cat([uncond.repeat(n, 1, 1), context])).sample
                eps_uncond, eps_cond = out.chunk(2)
                eps = cfg_epsilon(eps_cond, eps_uncond, self.guidance_scale)
        return eps.view(n, b, *x.shape[1:])

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, embeds, uncond, weights, generator: torch.Generator,
               beta: float | None = None) -> SampleResult:
        """Run the chain from ``x_T`` for objective weights ``weights`` (length K; any finite values)."""
        betas = [k.beta for k in self.kernels]
        lam = composition_coefficients(weights, len(self.kernels), betas, beta)
        use_reference = abs(1.0 - float(lam.sum())) > SUM_TOLERANCE
        active = [i for i, value in enumerate(lam.tolist()) if value != 0.0]
        names = [self.kernels[i].name for i in active] + ([REFERENCE] if use_reference else [])
        x, diagnostics = x_T, []
        s = self.schedule
        for step in range(len(s)):
            alpha, alpha_prev, sigma = (s.alpha[step].to(x), s.alpha_prev[step].to(x), s.sigma[step].to(x))
            eps = self.epsilons(x, step, embeds, uncond, names)
            means = ddim_mean(x.unsqueeze(0), eps, alpha, alpha_prev, sigma)
            k = len(active)
            variances = torch.stack([self._variance(self.kernels[i], step, x).expand_as(x) for i in active]) \
                if k else x.new_zeros((0, *x.shape))
            ref_mean = means[k] if use_reference else None
            ref_var = self._variance(None, step, x) if use_reference else None
            mean, var = compose_gaussian(means[:k], variances, lam[active].tolist(), ref_mean, ref_var)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = mean + var.sqrt() * noise
            diagnostics.append({"step": step, "mean_std": float(var.sqrt().mean())})
        rows = len(names) * (2 if self.guidance_scale != 1.0 else 1)
        return SampleResult(latents=x, nfe_per_image=rows * len(s), diagnostics=diagnostics)
