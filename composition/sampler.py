"""Denoising-time samplers over K LoRA base models: MSDDA and the baselines of DESIGN section 4.

Every sampler runs the same DDIM (``eta > 0``) chain from the same ``x_T`` and noise stream, and differs only in
how a step's kernel is formed:

============  ============================================================================  ====================
sampler       step                                                                          UNet rows per step
============  ============================================================================  ====================
MSDDA         ``compose_gaussian`` of the K base kernels (+ reference when sum lam != 1)    K (+1)
epsilon blend ``eps = sum w_i eps_i (+ (1 - sum w) eps_ref)``, DDIM step with ``sigma_t``  K (+1)
rewarded soup one adapter with ``Delta W = sum w_i B_i A_i``                                1
CoDe          reference; every B steps keep the best of N candidates under the score        N
RGG           reference, mean ``+ lambda * sigma_t^2 * grad_x score(x0_hat) / beta``     1 forward + backward
============  ============================================================================  ====================

All K adapters of a step go through the UNet in one batched call (``composition.batched``). ``nfe_per_image``
counts UNet rows per image; a backward pass through the UNet counts as two (the usual forward-equivalent cost).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from composition.batched import REFERENCE, mixed_adapter_batch, routing
from composition.msdda import SUM_TOLERANCE, compose_gaussian, composition_coefficients
from training.policy import DDIMSchedule, cfg_epsilon, ddim_mean, ddim_x0

Score = Callable[[torch.Tensor], torch.Tensor]
"""``score(x0_latents [M, ...]) -> [M]``: ``sum_i w_i R_i(decode(x0))`` with rows in candidate-major order."""


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


class DDIMComposer:
    """Shared machinery: the schedule, batched guided epsilons and the base kernels' variances."""

    method = "base"

    def __init__(self, unet, schedule: DDIMSchedule, guidance_scale: float, kernels: Sequence[BaseKernel]):
        self.unet, self.schedule, self.guidance_scale = unet, schedule, guidance_scale
        self.kernels = list(kernels)

    @property
    def rows_per_eval(self) -> int:
        return 1 if self.guidance_scale == 1.0 else 2

    def coefficients(self, step: int, like: torch.Tensor):
        s = self.schedule
        return s.alpha[step].to(like), s.alpha_prev[step].to(like), s.sigma[step].to(like)

    def variance(self, kernel: BaseKernel | None, step: int, like: torch.Tensor) -> torch.Tensor:
        """``sigma_t^2 * exp(v[t])`` of ``kernel`` (``None``: the reference), broadcastable to ``like``."""
        return self.variance_from_log_offset(None if kernel is None else kernel.log_variance, step, like)

    def variance_from_log_offset(self, log_variance, step: int, like: torch.Tensor) -> torch.Tensor:
        base = self.schedule.sigma[step].to(like) ** 2
        if log_variance is None:
            return base.view(*([1] * like.dim()))
        v = log_variance[step].to(like)
        shape = (1, -1, *([1] * (like.dim() - 2))) if v.numel() > 1 else (1,) * like.dim()
        return base * v.view(shape).exp()

    def guided(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor):
        if self.guidance_scale == 1.0:
            return self.unet(x, t, encoder_hidden_states=context).sample
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([uncond, context])).sample
        eps_uncond, eps_cond = out.chunk(2)
        return cfg_epsilon(eps_cond, eps_uncond, self.guidance_scale)

    @torch.no_grad()
    def epsilons(self, x: torch.Tensor, step: int, embeds, uncond, names: list[str]) -> torch.Tensor:
        """``[len(names), B, ...]`` guided epsilons from one UNet call routed by adapter name."""
        n, b = len(names), x.shape[0]
        xs = x.repeat(n, *([1] * (x.dim() - 1)))
        t = self.schedule.timesteps[step].expand(n * b).to(x.device)
        uncond_rows = None if uncond is None else uncond.expand(b, -1, -1).repeat(n, 1, 1)
        with mixed_adapter_batch(self.unet, routing(names, b)):
            eps = self.guided(xs, t, embeds.repeat(n, 1, 1), uncond_rows)
        return eps.view(n, b, *x.shape[1:])

    @staticmethod
    def noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    def plan(self, weights) -> tuple[torch.Tensor, list[int], bool]:
        """``(lam, active model indices, whether the reference is needed)`` for objective weights ``w``."""
        lam = composition_coefficients(weights, len(self.kernels), [k.beta for k in self.kernels])
        active = [i for i, value in enumerate(lam.tolist()) if value != 0.0]
        return lam, active, abs(1.0 - float(lam.sum())) > SUM_TOLERANCE

    def sample(self, x_T, embeds, uncond, weights, generator: torch.Generator, score: Score | None = None
               ) -> SampleResult:
        raise NotImplementedError


class MSDDASampler(DDIMComposer):
    """Every step is the closed-form product of the base kernels (``composition.msdda.compose_gaussian``)."""

    method = "msdda"

    @torch.no_grad()
    def sample(self, x_T, embeds, uncond, weights, generator, score=None) -> SampleResult:
        lam, active, use_reference = self.plan(weights)
        names = [self.kernels[i].name for i in active] + ([REFERENCE] if use_reference else [])
        x, diagnostics, k = x_T, [], len(active)
        for step in range(len(self.schedule)):
            started = time.perf_counter()
            alpha, alpha_prev, sigma = self.coefficients(step, x)
            eps = self.epsilons(x, step, embeds, uncond, names)
            unet_done = time.perf_counter()
            means = ddim_mean(x.unsqueeze(0), eps, alpha, alpha_prev, sigma)
            variances = (torch.stack([self.variance(self.kernels[i], step, x).expand_as(x) for i in active])
                         if k else x.new_zeros((0, *x.shape)))
            ref_mean = means[k] if use_reference else None
            ref_var = self.variance(None, step, x) if use_reference else None
            mean, var = compose_gaussian(means[:k], variances, lam[active].tolist(), ref_mean, ref_var)
            composed = time.perf_counter()
            x = mean + var.sqrt() * self.noise(x, generator)
            diagnostics.append({"step": step, "std": float(var.sqrt().mean()),
                                "std_over_sigma": float(var.sqrt().mean() / sigma),
                                "unet_seconds": unet_done - started, "compose_seconds": composed - unet_done,
                                "step_seconds": time.perf_counter() - started})
        return SampleResult(x, len(names) * self.rows_per_eval * len(self.schedule), diagnostics)


class EpsilonBlendSampler(DDIMComposer):
    """DB-MPA: ``eps = sum_i w_i eps_i + (1 - sum_i w_i) eps_ref``, then a plain DDIM step with ``sigma_t``."""

    method = "db"

    @torch.no_grad()
    def sample(self, x_T, embeds, uncond, weights, generator, score=None) -> SampleResult:
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
        active = [i for i, value in enumerate(w.tolist()) if value != 0.0]
        remainder = 1.0 - float(w.sum())
        use_reference = abs(remainder) > SUM_TOLERANCE
        names = [self.kernels[i].name for i in active] + ([REFERENCE] if use_reference else [])
        coefficients = [float(w[i]) for i in active] + ([remainder] if use_reference else [])
        x = x_T
        for step in range(len(self.schedule)):
            alpha, alpha_prev, sigma = self.coefficients(step, x)
            if names:
                eps = self.epsilons(x, step, embeds, uncond, names)
                blend = sum(c * e for c, e in zip(coefficients, eps))
            else:
                blend = torch.zeros_like(x)
            x = ddim_mean(x, blend, alpha, alpha_prev, sigma) + sigma * self.noise(x, generator)
        return SampleResult(x, len(names) * self.rows_per_eval * len(self.schedule))


class RewardedSoupSampler(DDIMComposer):
    """RS: one adapter ``soup_adapter`` whose weights are the merged ``sum_i w_i B_i A_i`` (see
    :func:`composition.batched.merge_lora_states`; the caller loads them for each weight vector). The variance
    offset is merged the same way: ``v = sum_i w_i v_i``."""

    method = "rs"

    def __init__(self, unet, schedule, guidance_scale, kernels, soup_adapter: str):
        super().__init__(unet, schedule, guidance_scale, kernels)
        self.soup_adapter = soup_adapter

    @torch.no_grad()
    def sample(self, x_T, embeds, uncond, weights, generator, score=None) -> SampleResult:
        log_variance = None
        offsets = [(float(w), k.log_variance) for w, k in zip(weights, self.kernels) if k.log_variance is not None]
        if offsets:
            log_variance = sum(w * v for w, v in offsets)
        x = x_T
        for step in range(len(self.schedule)):
            alpha, alpha_prev, sigma = self.coefficients(step, x)
            eps = self.epsilons(x, step, embeds, uncond, [self.soup_adapter])[0]
            var = self.variance_from_log_offset(log_variance, step, x)
            x = ddim_mean(x, eps, alpha, alpha_prev, sigma) + var.sqrt() * self.noise(x, generator)
        return SampleResult(x, self.rows_per_eval * len(self.schedule))


class CoDeSampler(DDIMComposer):
    """CoDe (blockwise best-of-N on the reference): every ``block`` steps, run ``candidates`` reference chains
    for the block from the current state and keep, per image, the one whose ``x0_hat`` scores best."""

    method = "code"

    def __init__(self, unet, schedule, guidance_scale, kernels, candidates: int = 4, block: int = 5):
        super().__init__(unet, schedule, guidance_scale, kernels)
        if candidates < 1 or block < 1:
            raise ValueError(f"CoDe needs candidates >= 1 and block >= 1, got N={candidates}, B={block}")
        self.candidates, self.block = candidates, block

    @torch.no_grad()
    def sample(self, x_T, embeds, uncond, weights, generator, score=None) -> SampleResult:
        if score is None:
            raise ValueError("CoDe needs a score function of the clean estimate")
        n, b, steps = self.candidates, x_T.shape[0], len(self.schedule)
        x, picks = x_T, []
        for start in range(0, steps, self.block):
            xs = x.repeat(n, *([1] * (x.dim() - 1)))
            context = embeds.repeat(n, 1, 1)
            for step in range(start, min(start + self.block, steps)):
                alpha, alpha_prev, sigma = self.coefficients(step, xs)
                eps = self.epsilons(xs, step, context, None if uncond is None else uncond[:1], [REFERENCE])[0]
                xs = ddim_mean(xs, eps, alpha, alpha_prev, sigma) + sigma * self.noise(xs, generator)
            x0 = xs if step == steps - 1 else ddim_x0(xs, eps, alpha_prev)  # reuse the last epsilon
            best = score(x0).view(n, b).argmax(0)
            x = xs.view(n, b, *x.shape[1:])[best, torch.arange(b)]
            picks.append(best.float().mean().item())
        return SampleResult(x, n * self.rows_per_eval * steps, [{"block_start": s * self.block, "mean_pick": p}
                                                                 for s, p in enumerate(picks)])


class RGGSampler(DDIMComposer):
    """Reward-gradient guidance on the reference:
    ``mean = DDIM mean + scale * sigma_t^2 * grad_x score(x0_hat(x)) / beta`` (differentiable rewards only)."""

    method = "rgg"

    def __init__(self, unet, schedule, guidance_scale, kernels, beta: float, scale: float = 1.0):
        super().__init__(unet, schedule, guidance_scale, kernels)
        self.beta, self.scale = beta, scale

    def sample(self, x_T, embeds, uncond, weights, generator, score=None) -> SampleResult:
        if score is None:
            raise ValueError("RGG needs a differentiable score function of the clean estimate")
        x, diagnostics = x_T, []
        uncond_rows = None if uncond is None else uncond.expand(x.shape[0], -1, -1)
        for step in range(len(self.schedule)):
            alpha, alpha_prev, sigma = self.coefficients(step, x)
            x_in = x.detach().requires_grad_(True)
            t = self.schedule.timesteps[step].expand(x.shape[0]).to(x.device)
            with torch.enable_grad(), mixed_adapter_batch(self.unet, [REFERENCE] * x.shape[0]):
                eps = self.guided(x_in, t, embeds, uncond_rows)
                (grad,) = torch.autograd.grad(score(ddim_x0(x_in, eps, alpha)).sum(), x_in)
            mean = ddim_mean(x, eps.detach(), alpha, alpha_prev, sigma) + self.scale * sigma**2 * grad / self.beta
            x = (mean + sigma * self.noise(x, generator)).detach()
            diagnostics.append({"step": step, "guidance_norm": float((sigma**2 * grad / self.beta).norm() / len(x))})
        return SampleResult(x, 3 * self.rows_per_eval * len(self.schedule), diagnostics)
