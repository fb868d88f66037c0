"""The one reverse-chain runner: the trainer's rollouts, evaluation sampling and every composition method.

A chain is ``x_T -> x_{T-1} -> ... -> x_0`` where each step draws from a Gaussian kernel that a *kernel
function* ``kernel(x_t, step) -> GaussianStep`` builds from the current state. What differs between a trained
policy, the reference, MSDDA and the baselines is only that function (docs/architecture.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from training.step.kernel import DDIMSchedule, GaussianStep

KernelFunction = Callable[[torch.Tensor, int], GaussianStep]
"""``kernel(x_t, step) -> GaussianStep``: the kernel of reverse step ``step`` at states ``x_t``
``[B, ...]``."""


@dataclass
class Chain:
    """A run of the chain: the last state, the states kept on the way (``{step: x_t}``, the state *before*
    that step), and one diagnostics dict per step (``step``, ``std``, ``std_over_sigma``, ``step_seconds`` and
    the kernel's own ``info``)."""

    latents: torch.Tensor
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    diagnostics: list[dict] = field(default_factory=list)
    kl: torch.Tensor | None = None
    """Per image, the path KL from the reference ``sum_t KL(kernel_t || reference_t)`` (analytic, Gaussian),
    when a ``reference`` kernel function was given; a search may set a bound instead."""


def run_chain(
    schedule: DDIMSchedule,
    x_T: torch.Tensor,
    kernel: KernelFunction,
    generator: torch.Generator | None,
    start: int = 0,
    stop: int | None = None,
    keep: Collection[int] = (),
    diagnose: bool = True,
    reference: KernelFunction | None = None,
) -> Chain:
    """Run steps ``start .. stop - 1`` (default: the whole schedule) from ``x_T``, sampling each step's
    kernel.

    ``keep`` names the steps whose incoming state is returned (``stop`` itself may be named: the last state).
    With ``diagnose`` false no per-step statistics are computed (no device synchronisation). With a
    ``reference`` kernel function, each step's analytic ``KL(kernel || reference)`` at the current states is
    summed per image into :attr:`Chain.kl`.
    """
    stop = len(schedule) if stop is None else stop
    x, states, diagnostics = x_T, {}, []
    kl = None if reference is None else torch.zeros(x_T.shape[0], device=x_T.device)
    for step in range(start, stop):
        if step in keep:
            states[step] = x
        started = time.perf_counter()
        step_kernel = kernel(x, step)
        if reference is not None:
            kl = kl + step_kernel.kl(reference(x, step)).float()
        x = step_kernel.sample(generator)
        if diagnose:
            std = float(step_kernel.std.mean())
            diagnostics.append(
                {
                    "step": step,
                    "std": std,
                    "std_over_sigma": std / float(schedule.sigma[step]),
                    "step_seconds": time.perf_counter() - started,
                    **step_kernel.info,
                }
            )
    if stop in keep:
        states[stop] = x
    return Chain(x, states, diagnostics, kl)
