"""The kernel check watched while training: how far the policy's step kernels are from the step optimum
``pi* ∝ p_ref exp(r / beta)`` at a few fixed held-out states (docs/design.md §5.10).

1. Held-out states: ``train.kernel_check_chains`` reference chains drawn from a seed of their own
   (``train.eval_seed``), every state of every step.
2. The optimum's drift ``d* = mu* - mu_ref`` at each state, once: it does not depend on the policy
   (§1.3). Exact where the problem knows ``pi*`` in closed form (a latent quadratic reward with
   ``x0_estimate: current_eps``, the analytic toy); otherwise from ``train.kernel_check_actions`` antithetic
   reference actions weighted by ``softmax(r / beta)``, from two independent halves so that ``|d*|^2`` is
   noise-corrected (:mod:`training.step.optimum`).
3. Each check costs one policy mean per state, ``d_theta = mu_theta - mu_ref``, and reports the path-pooled

       kernel_error  = sqrt( sum_t |d_theta - d*|^2 / sigma_t^2  /  sum_t |d*|^2 / sigma_t^2 )
       kernel_cosine = sum_t <d_theta, d*> / sigma_t^2  /  sqrt( sum_t |d_theta|^2 / sigma_t^2
                                                                * sum_t |d*|^2 / sigma_t^2 )

   (:func:`~training.step.optimum.path_errors`): 0 at the optimum, 1 for a policy that stays at the
   reference.

A check that cannot run (a reward that is not finite at a held-out action) is *missing*, never a pass: its
figures are NaN and :attr:`KernelCheck.missing` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.step.chain import run_chain
from training.step.kernel import GaussianStep
from training.step.optimum import StepOptimum, drift_energies, estimate_optimum, exact_optimum, path_errors

CHECK_SEED_OFFSET = 104_729
"""The held-out states' generator is seeded ``train.eval_seed + CHECK_SEED_OFFSET``: apart from training's
states and from the evaluation's images."""


@dataclass
class HeldOutStep:
    """One step's held-out states ``x`` ``[B, ...]``, the reference's mean there and the optimum's drift."""

    step: int
    x: torch.Tensor
    reference_mean: torch.Tensor
    optimum: StepOptimum
    sigma: float


@dataclass
class KernelCheck:
    """The held-out states and their optimum (module docstring, steps 1 and 2); call it on the problem for
    ``{"kernel_error", "kernel_cosine"}`` (step 3)."""

    steps: list[HeldOutStep]
    cond: object
    exact: bool
    missing: str | None = None
    """Why the check cannot run, or ``None``."""

    @classmethod
    @torch.no_grad()
    def build(cls, problem, chains: int, actions: int, beta: float, seed: int) -> KernelCheck:
        """Draw the held-out states and compute the optimum at each (exact when the problem's
        ``exact_step_optimum`` knows it, else from ``actions`` antithetic reference actions)."""
        rows = problem.unet_evaluations  # the check is evaluation, not training cost
        generator = torch.Generator().manual_seed(seed)
        schedule = problem.policy.schedule
        x_T, cond = problem.initial_states(chains, generator)
        states = run_chain(
            schedule,
            x_T,
            lambda x, step: problem.reference(x, step, cond),
            generator,
            keep=range(len(schedule)),
            diagnose=False,
        ).states
        held_out, exact, missing = [], True, None
        for step in range(len(schedule)):
            x = states[step]
            reference = problem.reference(x, step, cond)
            optimum = problem.exact_step_optimum(x, step, cond, beta)
            if optimum is not None:
                estimate = exact_optimum(optimum.mean, optimum.variance, reference.mean)
            else:
                exact = False
                drawn = reference.sample(generator, num=actions, antithetic=True)
                rewards = problem.step_reward(x, drawn, step, cond).double()
                if not torch.isfinite(rewards).all():
                    missing = f"the reward is not finite at a held-out action of step {step}"
                    break
                estimate = estimate_optimum(drawn.flatten(2), reference.mean.flatten(1), rewards / beta)
            sigma = float(schedule.sigma[step])
            held_out.append(HeldOutStep(step, x, reference.mean, estimate, sigma))
        problem.unet_evaluations = rows
        return cls(held_out, cond, exact, missing)

    @torch.no_grad()
    def __call__(self, problem) -> dict[str, float]:
        """``{"kernel_error", "kernel_cosine"}`` of the problem's current policy (NaN when missing)."""
        if self.missing is not None:
            return {"kernel_error": math.nan, "kernel_cosine": math.nan}
        rows = problem.unet_evaluations
        energies = []
        for held in self.steps:
            policy: GaussianStep = problem.policy(held.x, held.step, self.cond)
            drift = (policy.mean.float() - held.reference_mean.float()).flatten(1)
            energies.append(drift_energies(drift, held.optimum, held.sigma))
        problem.unet_evaluations = rows
        path = path_errors(energies)
        return {"kernel_error": path["path_relative_error"], "kernel_cosine": path["path_cosine"]}
