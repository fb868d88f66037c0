"""Images sampled from a :class:`~training.sd_problem.DiffusionStepProblem`, for the benchmarks that score
a policy's images (``objective_conflict.py``, ``sample_efficiency.py``)."""

from __future__ import annotations

import torch

from training.sd_problem import DiffusionStepProblem


@torch.no_grad()
def sample_images(
    problem: DiffusionStepProblem,
    prompt_index: torch.Tensor,
    generator: torch.Generator,
    use_policy: bool = True,
    batch_size: int = 128,
) -> tuple[torch.Tensor, list[str], float]:
    """Full DDIM chains of the policy (or, with ``use_policy=False``, the reference), decoded: returns the
    images, the prompts and the mean per-step KL(policy || reference)."""
    latents, prompts, kl = problem.sample_latents(prompt_index, generator, use_policy, batch_size)
    return problem.decode(latents), prompts, kl
