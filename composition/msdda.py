"""MSDDA: the closed-form product of Gaussian step policies (docs/design.md §2.2-2.3).

The step-level optimum for the combined reward ``sum_i w_i r_i`` with KL coefficient ``beta`` is

    pi_w*(a|s) ∝ p_ref(a|s) * exp(sum_i w_i r_i(s, a) / beta)
               = p_ref^(1 - sum_i lam_i) * prod_i pi_i*^(lam_i),      lam_i = w_i * beta_i / beta,

and with diagonal Gaussian kernels it is again Gaussian, element-wise:

    P   = (1 - sum_i lam_i) / sigma_ref^2 + sum_i lam_i / sigma_i^2          (must be > 0)
    mu  = [(1 - sum_i lam_i) * mu_ref / sigma_ref^2 + sum_i lam_i * mu_i / sigma_i^2] / P
    var = 1 / P

This module imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SUM_TOLERANCE = 1e-6


def composition_coefficients(
    weights: torch.Tensor | Sequence[float],
    num_models: int,
    betas: torch.Tensor | Sequence[float] | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """``lam_i = w_i * beta_i / beta`` (float64, shape ``[K]``); ``lam = w`` when ``betas`` is None.

    With equal ``betas`` and ``beta=None``, ``beta`` defaults to their common value (so ``lam = w``). Raises
    ``ValueError`` for a wrong length, non-finite values, or differing ``betas`` without ``beta``.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != num_models:
        raise ValueError(f"weights has {w.numel()} entries but there are {num_models} base models")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if betas is None:
        return w
    b = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if b.numel() != num_models:
        raise ValueError(f"betas has {b.numel()} entries but there are {num_models} base models")
    if not torch.isfinite(b).all() or (b <= 0).any():
        raise ValueError(f"betas must be finite and positive, got {b.tolist()}")
    if beta is None:
        if not torch.allclose(b, b[0].expand_as(b)):
            raise ValueError(
                f"betas differ between base models ({b.tolist()}): set the target beta (composition.beta)"
            )
        beta = float(b[0])
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be finite and positive, got {beta}")
    return w * b / beta


def compose_gaussian(
    means: torch.Tensor,
    variances: torch.Tensor | float,
    weights: torch.Tensor | Sequence[float],
    ref_mean: torch.Tensor | None = None,
    ref_var: torch.Tensor | float | None = None,
    betas: torch.Tensor | Sequence[float] | None = None,
    beta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``p_ref^(1 - sum lam) * prod_i pi_i^lam_i`` (see the module docstring).

    Args:
        means: ``[K, ...]`` means of the base policies.
        variances: broadcastable to ``means``: the base policies' variances.
        weights: ``[K]`` objective weights ``w`` (any finite values, inside or outside the simplex).
        ref_mean, ref_var: the reference kernel; required unless ``sum lam == 1``.
        betas: ``[K]`` KL coefficients the base models were trained with; ``None`` means ``lam = w``.
        beta: KL coefficient of the target; required when ``betas`` differ.

    Returns:
        ``(mean, variance)``, each of shape ``means.shape[1:]`` (broadcast with the reference).

    Raises:
        ValueError: wrong weight length, non-finite inputs, ``sum lam != 1`` without a reference, or a
            precision ``<= 0`` anywhere.
    """
    means = torch.as_tensor(means)
    if means.dim() < 1:
        raise ValueError("means must have a leading model dimension [K, ...]")
    k = means.shape[0]
    lam = composition_coefficients(weights, k, betas, beta)
    variances = torch.as_tensor(variances, dtype=means.dtype, device=means.device)
    _check_finite(means, "means")
    _check_finite(variances, "variances")
    if (variances <= 0).any():
        raise ValueError("variances must be positive")

    ref_weight = 1.0 - float(lam.sum())
    shape = (k,) + (1,) * (means.dim() - 1)
    lam_t = lam.to(dtype=means.dtype, device=means.device).view(shape)
    precisions = torch.broadcast_to(lam_t / variances, means.shape)
    precision = precisions.sum(0)
    weighted = (precisions * means).sum(0)

    if abs(ref_weight) > SUM_TOLERANCE:
        if ref_mean is None or ref_var is None:
            raise ValueError(
                f"sum of lam = {1 - ref_weight:.6g} != 1: "
                "the reference kernel (ref_mean, ref_var) is required"
            )
        ref_mean = torch.as_tensor(ref_mean, dtype=means.dtype, device=means.device)
        ref_var = torch.as_tensor(ref_var, dtype=means.dtype, device=means.device)
        _check_finite(ref_mean, "ref_mean")
        _check_finite(ref_var, "ref_var")
        if (ref_var <= 0).any():
            raise ValueError("ref_var must be positive")
        precision = precision + ref_weight / ref_var
        weighted = weighted + (ref_weight / ref_var) * ref_mean

    if not (precision > 0).all():
        worst = float(precision.min())
        raise ValueError(
            f"composed precision is not positive (min {worst:.3g}): these weights give no valid Gaussian"
        )
    variance = 1.0 / precision
    return weighted * variance, variance


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains non-finite values")
