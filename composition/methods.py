"""Composition methods: MSDDA and the baselines, each a small function over one shared chain runner.

A method is either a **kernel function** ``(composer, weights, batch, x_t, step) -> GaussianStep`` that
:func:`training.step.chain.run_chain` samples step by step (MSDDA, the epsilon blend, the rewarded soup), or a
**search** ``(composer, weights, x_T, batch, generator, score) -> Chain`` around the runner (CoDe, RGG).
:data:`METHODS` is the one registry: the CLI, the sweep and ``docs/adding-a-method.md`` read it.

=========  =============================================================================  ===================
method     step (docs/design.md §3)                                                       UNet rows per step
=========  =============================================================================  ===================
msdda      ``compose_gaussian`` of the K base kernels (+ reference when sum lam != 1)     K (+1)
db         ``eps = sum w_i eps_i (+ (1 - sum w) eps_ref)``, DDIM step with ``sigma_t``    K (+1)
rs         one adapter with ``Delta W = sum w_i B_i A_i``, ``v = sum w_i v_i``            1
code       reference; every B steps keep the best of N candidates under the score         N
rgg        reference, mean ``+ lambda * sigma_t^2 * grad_x score(x0_hat)``                1 forward + backward
=========  =============================================================================  ===================

Every UNet row goes through the composer's :class:`~training.step.policy.GuidedEpsilon`, which counts them:
NFE is rows per image, a backward pass counting two.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from composition.batched import (
    REFERENCE,
    clear_stacked,
    load_adapter,
    mixed_adapter_batch,
    routing,
)
from composition.msdda import SUM_TOLERANCE, compose_gaussian, composition_coefficients
from composition.soup import lora_ranks, merge_lora_states
from configs.schema import CompositionConfig
from training.card import LoraSpec
from training.step.chain import Chain, run_chain
from training.step.kernel import DDIMSchedule, GaussianStep
from training.step.policy import GuidedEpsilon

Score = Callable[[torch.Tensor], torch.Tensor]
"""``score(x0_latents [M, ...]) -> [M]``: ``sum_i c_i R_i(decode(x0))`` with rows in candidate-major order."""

SOUP_ADAPTER = "__soup__"


@dataclass(frozen=True)
class Batch:
    """The conditioning of one batch: prompt states ``[B, L, D]`` and the empty prompt's ``[1, L, D]``."""

    embeds: torch.Tensor
    uncond: torch.Tensor | None

    def cond(self, copies: int = 1) -> dict:
        """The epsilon model's ``cond`` for ``copies`` stacked copies of the batch."""
        rows = len(self.embeds)
        uncond = None if self.uncond is None else self.uncond.expand(rows, -1, -1).repeat(copies, 1, 1)
        return {"embeds": self.embeds.repeat(copies, 1, 1), "uncond": uncond}

    def repeat(self, copies: int) -> Batch:
        return Batch(self.embeds.repeat(copies, 1, 1), self.uncond)


class Composer:
    """What every method works with: the UNet carrying the K base models' adapters, the schedule, guided and
    counted epsilons, and each base model's learned variance and beta.

    ``models`` are loaded base models (``training.card.LoadedBaseModel``); ``options`` the ``composition``
    settings (``None``: the schema's defaults); ``forward`` (default: the UNet) is what runs the UNet, e.g.
    :func:`composition.batched.compile_unet`'s compiled UNet.
    """

    def __init__(
        self,
        unet,
        schedule: DDIMSchedule,
        guidance_scale: float,
        models: Sequence,
        options: CompositionConfig | None,
        forward=None,
    ):
        self.unet, self.schedule = unet, schedule
        self.options = CompositionConfig() if options is None else options
        self.models = list(models)
        self.eps = GuidedEpsilon(unet, guidance_scale, forward)

    @property
    def names(self) -> list[str]:
        """Adapter names in the UNet, one per base model (its objective)."""
        return [m.objective for m in self.models]

    @property
    def plan(self) -> str:
        """``one_call`` or ``per_model``: ``options.plan``, with ``auto`` resolved by the UNet's device (K
        calls on the CPU, one call elsewhere)."""
        plan = self.options.plan
        if plan == "auto":
            return "per_model" if self.unet.device.type == "cpu" else "one_call"
        return plan

    def epsilons(self, x: torch.Tensor, step: int, batch: Batch, adapters: list[str]) -> torch.Tensor:
        """``[len(adapters), B, ...]`` guided epsilons routed by adapter name: one UNet call of
        ``len(adapters) * B`` rows, or one call of ``B`` rows per adapter (:attr:`plan`)."""
        n, b = len(adapters), x.shape[0]
        weights = self.options.routed_weights
        if self.plan == "per_model" and n > 1:
            t, cond = self.schedule.timestep(step, x), batch.cond(1)
            eps = []
            for name in adapters:
                with mixed_adapter_batch(self.unet, routing([name], b), weights):
                    eps.append(self.eps(x, t, cond))
            return torch.stack(eps)
        xs = x.repeat(n, *([1] * (x.dim() - 1)))
        with mixed_adapter_batch(self.unet, routing(adapters, b), weights):
            eps = self.eps(xs, self.schedule.timestep(step, xs), batch.cond(n))
        return eps.view(n, b, *x.shape[1:])

    def reference_kernel(self, batch: Batch):
        """The reference's kernel function for ``batch``, or ``None`` unless ``options.path_kl``: the
        yardstick of each image's path KL. Its UNet rows are evaluation, not the method's cost: NFE does not
        count them."""
        if not self.options.path_kl:
            return None

        def reference(x: torch.Tensor, step: int) -> GaussianStep:
            rows = self.eps.rows
            eps = self.epsilons(x, step, batch, [REFERENCE])[0]
            self.eps.rows = rows
            return self.schedule.kernel(x, eps, step)

        return reference

    def coefficients(self, weights: Sequence[float]) -> tuple[torch.Tensor, list[int], bool]:
        """``(lam, active model indices, whether the reference is needed)`` for objective weights ``w``, with
        ``lam_i = w_i beta_i / beta`` for the target ``beta = options.beta`` (``lam = w`` when unset)."""
        lam = composition_coefficients(
            weights, len(self.models), [m.beta for m in self.models], self.options.beta
        )
        active = [i for i, value in enumerate(lam.tolist()) if value != 0.0]
        return lam, active, abs(1.0 - float(lam.sum())) > SUM_TOLERANCE

    def load_soup(self, weights: Sequence[float]) -> None:
        """Put the exact rewarded soup of ``weights`` (coefficients ``lam``) on the UNet as adapter
        :data:`SOUP_ADAPTER`."""
        from peft import set_peft_model_state_dict

        lam = self.coefficients(weights)[0].tolist()
        scaled = [c * m.card.lora.scaling for c, m in zip(lam, self.models)]
        merged = merge_lora_states([m.lora for m in self.models], scaled)
        if SOUP_ADAPTER in getattr(self.unet, "peft_config", {}):
            clear_stacked(self.unet)
            set_peft_model_state_dict(self.unet, merged, adapter_name=SOUP_ADAPTER)
        else:  # the models' target sets may differ: each module's rank is the sum over the models adapting it
            ranks = lora_ranks(merged)
            targets = list(dict.fromkeys(t for m in self.models for t in m.targets))
            spec = LoraSpec(rank=max(ranks.values()), targets=targets)
            load_adapter(self.unet, SOUP_ADAPTER, merged, spec, ranks)


# ------------------------------------------------------------------------------------------ kernel methods


def msdda(composer: Composer, weights, batch: Batch, x: torch.Tensor, step: int) -> GaussianStep:
    """MSDDA: the closed-form product of the base kernels (and the reference's when ``sum lam != 1``)."""
    started = time.perf_counter()
    lam, active, use_reference = composer.coefficients(weights)
    adapters = [composer.names[i] for i in active] + ([REFERENCE] if use_reference else [])
    eps = composer.epsilons(x, step, batch, adapters)
    unet_done = time.perf_counter()
    schedule, k = composer.schedule, len(active)
    means = schedule.kernel(x.unsqueeze(0), eps, step).mean
    variances = (
        torch.stack(
            [schedule.variance(step, x, composer.models[i].log_variance).expand_as(x) for i in active]
        )
        if k
        else x.new_zeros((0, *x.shape))
    )
    ref_mean = means[k] if use_reference else None
    ref_var = schedule.variance(step, x) if use_reference else None
    mean, variance = compose_gaussian(means[:k], variances, lam[active].tolist(), ref_mean, ref_var)
    return GaussianStep(
        mean,
        variance,
        {"unet_seconds": unet_done - started, "compose_seconds": time.perf_counter() - unet_done},
    )


def epsilon_blend(composer: Composer, weights, batch: Batch, x: torch.Tensor, step: int) -> GaussianStep:
    """DB-MPA: ``eps = sum_i lam_i eps_i + (1 - sum_i lam_i) eps_ref``, then a plain DDIM step with
    ``sigma_t`` (``lam = w`` unless a target beta is set)."""
    lam, active, use_reference = composer.coefficients(weights)
    adapters = [composer.names[i] for i in active] + ([REFERENCE] if use_reference else [])
    coefficients = [float(lam[i]) for i in active] + ([1.0 - float(lam.sum())] if use_reference else [])
    eps = composer.epsilons(x, step, batch, adapters)
    return composer.schedule.kernel(x, sum(c * e for c, e in zip(coefficients, eps)), step)


def rewarded_soup(composer: Composer, weights, batch: Batch, x: torch.Tensor, step: int) -> GaussianStep:
    """RS: one adapter ``sum_i lam_i B_i A_i`` (loaded by :meth:`Composer.load_soup`), variance offset
    ``v = sum_i lam_i v_i``."""
    lam = composer.coefficients(weights)[0].tolist()
    offsets = [(c, m.log_variance) for c, m in zip(lam, composer.models) if m.log_variance is not None]
    log_variance = sum(w * v for w, v in offsets) if offsets else None
    eps = composer.epsilons(x, step, batch, [SOUP_ADAPTER])[0]
    return composer.schedule.kernel(x, eps, step, log_variance)


# ---------------------------------------------------------------------------------- searches around the chain


def code(composer: Composer, weights, x_T, batch: Batch, generator, score: Score) -> Chain:
    """CoDe (blockwise best-of-N on the reference): every ``code_block`` steps, run ``code_candidates``
    reference chains for the block from the current state and keep, per image, the one whose ``x0_hat`` scores
    best."""
    n, block, schedule = composer.options.code_candidates, composer.options.code_block, composer.schedule
    b, steps, candidates, last = x_T.shape[0], len(schedule), batch.repeat(n), {}

    def reference(x, step):
        last["eps"] = composer.epsilons(x, step, candidates, [REFERENCE])[0]
        return schedule.kernel(x, last["eps"], step)

    x, picks = x_T, []
    for start in range(0, steps, block):
        stop = min(start + block, steps)
        xs = run_chain(
            schedule, x.repeat(n, *([1] * (x.dim() - 1))), reference, generator, start, stop, diagnose=False
        ).latents
        x0 = xs if stop == steps else schedule.clean_estimate(xs, last["eps"], stop - 1, after=True)
        best = score(x0).view(n, b).argmax(0)
        x = xs.view(n, b, *x.shape[1:])[best, torch.arange(b)]
        picks.append({"block_start": start, "mean_pick": best.float().mean().item()})
    # Best-of-N from the reference moves each block's law at most log N from the reference's.
    bound = len(picks) * math.log(n) if composer.reference_kernel(batch) is not None else None
    return Chain(x, {}, picks, None if bound is None else torch.full((b,), bound, device=x.device))


def guided_step(
    composer: Composer, score: Score, batch: Batch, x: torch.Tensor, step: int, scale: float
) -> tuple[GaussianStep, GaussianStep]:
    """``(guided, plain)``: RGG's kernel ``mean = DDIM mean + scale * sigma_t^2 * grad_x score(x0_hat(x))``
    and the reference's unguided one, from one forward and one backward through the reference UNet."""
    schedule = composer.schedule
    x_in = x.detach().requires_grad_(True)
    with torch.enable_grad():
        eps = composer.epsilons(x_in, step, batch, [REFERENCE])[0]
        (grad,) = torch.autograd.grad(score(schedule.clean_estimate(x_in, eps, step)).sum(), x_in)
    composer.eps.count_backward(x.shape[0])
    plain = schedule.kernel(x, eps.detach(), step)
    sigma = schedule.sigma[step].to(x)
    guided = GaussianStep(
        plain.mean + scale * sigma**2 * grad,
        plain.variance,
        {"guidance_norm": float((sigma**2 * grad).norm() / len(x))},
    )
    return guided, plain


def reward_gradient_guidance(
    composer: Composer, weights, x_T, batch: Batch, generator, score: Score
) -> Chain:
    """RGG on the reference: ``mean = DDIM mean + rgg_scale * sigma_t^2 * grad_x score(x0_hat(x))``, with the
    score's coefficients ``w_i / beta`` (differentiable rewards only)."""
    last = {}

    def kernel(x, step):
        guided, last["plain"] = guided_step(composer, score, batch, x, step, composer.options.rgg_scale)
        return guided

    # the unguided step is the reference's kernel: the path KL costs no extra UNet rows
    reference = (lambda x, step: last["plain"]) if composer.reference_kernel(batch) is not None else None
    return run_chain(composer.schedule, x_T, kernel, generator, reference=reference)


# ----------------------------------------------------------------------------------------------- the registry


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    """A one-line ``ValueError`` naming ``what`` when any of ``tensors`` holds a NaN or an infinity (weights
    of a huge magnitude overflow float32): one device synchronisation for all of them."""
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise ValueError(f"{what} is not finite (NaN or infinity): use weights of a smaller magnitude")


MethodKernel = Callable[[Composer, Sequence[float], Batch, torch.Tensor, int], GaussianStep]
"""``(composer, weights, batch, x_t, step) -> GaussianStep``: a method's step kernel; bound to a composer,
weights and batch it becomes the chain runner's :data:`~training.step.chain.KernelFunction`."""
Search = Callable[[Composer, Sequence[float], torch.Tensor, Batch, torch.Generator, "Score | None"], Chain]


@dataclass(frozen=True)
class ScoreNeed:
    """A method that calls the rewards while sampling: with coefficients ``w_i / beta`` (``per_beta``: the
    target beta, else each model's ``beta_i``) or ``w_i``, and through a differentiable decode
    (``differentiable``)."""

    per_beta: bool = False
    differentiable: bool = False


@dataclass(frozen=True)
class Method:
    """A registered composition method."""

    name: str
    label: str
    search: Search
    kind: str = "search"
    """``"kernel"``: a kernel function run by the chain runner; ``"search"``: its own loop around the
    runner."""
    score: ScoreNeed | None = None
    prepare: Callable[[Composer, Sequence[float]], None] | None = None
    """Called once per weight vector before sampling (the soup loads its merged adapter here)."""

    @classmethod
    def from_kernel(cls, name: str, label: str, kernel: MethodKernel, **kwargs) -> Method:
        """A method whose every step is ``kernel``, run by :func:`training.step.chain.run_chain`."""

        def search(composer, weights, x_T, batch, generator, score=None) -> Chain:
            def finite_kernel(x: torch.Tensor, step: int) -> GaussianStep:
                composed = kernel(composer, weights, batch, x, step)
                check_finite(f"composed step {step}", composed.mean, composed.variance)  # stop at the first
                return composed

            return run_chain(
                composer.schedule, x_T, finite_kernel, generator, reference=composer.reference_kernel(batch)
            )

        search.__doc__ = kernel.__doc__
        return cls(name, label, search, kind="kernel", **kwargs)

    @property
    def summary(self) -> str:
        """The first sentence of the method's docstring (the docs' method table)."""
        first = " ".join((self.search.__doc__ or "").strip().split("\n\n")[0].split())
        return first.replace("``", "`").replace(":meth:", "")

    def sample(self, composer: Composer, weights, x_T, batch: Batch, generator, score: Score | None = None):
        """``(chain, UNet rows per image)`` for one batch."""
        rows = composer.eps.rows
        chain = self.search(composer, weights, x_T, batch, generator, score)
        return chain, (composer.eps.rows - rows) / x_T.shape[0]


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method.from_kernel("msdda", "MSDDA", msdda),
        Method.from_kernel("db", "DB-MPA (epsilon blend)", epsilon_blend),
        Method.from_kernel("rs", "rewarded soup", rewarded_soup, prepare=Composer.load_soup),
        Method("code", "CoDe", code, score=ScoreNeed()),
        Method("rgg", "RGG", reward_gradient_guidance, score=ScoreNeed(per_beta=True, differentiable=True)),
    )
}
"""Every composition method by name. Adding one: write its function above and add one line here."""

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
"""A registered method's name: the choices of ``msdda compose --method`` and of the Prefect flows."""

DEFAULT_METHOD: MethodName = "msdda"
"""The method a composition runs when none is named (``msdda compose``, the ``compose`` flow, the jobs)."""


def method_rows() -> list[dict]:
    """The registry as JSON-ready rows (``msdda methods --json``): name, label, kind, whether the method calls
    the rewards while sampling, and what a step does."""
    return [
        {
            "name": m.name,
            "label": m.label,
            "kind": m.kind,
            "calls_rewards": m.score is not None,
            "summary": m.summary,
        }
        for m in METHODS.values()
    ]


def methods_table() -> str:
    """The registry as a Markdown table (``docs/adding-a-method.md`` embeds it; a test keeps them in step)."""
    rows = ["| name | label | kind | calls the rewards | what a step does |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        calls = "no" if m.score is None else ("gradient" if m.score.differentiable else "yes")
        rows.append(f"| `{m.name}` | {m.label} | {m.kind} | {calls} | {m.summary} |")
    return "\n".join(rows)


if __name__ == "__main__":  # `python -m composition.methods`: the table for docs/adding-a-method.md
    print(methods_table())
