"""The Gaussian step policy: an epsilon model over a :class:`~training.step.kernel.DDIMSchedule`
(docs/design.md §1).

Anything that maps ``(x_t, t, cond)`` to an epsilon-prediction is an :data:`EpsilonModel`: a diffusers UNet
with classifier-free guidance (:class:`GuidedEpsilon`) or a small MLP on 2-D toy data alike. The policy turns
it into the step kernel ``N(ddim_mean(eps), sigma_t^2 * exp(v[t]))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.step.kernel import DDIMSchedule, GaussianStep, LogVarianceOffset

EpsilonModel = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
"""``eps_model(x_t, t, cond) -> eps`` with ``t`` a 1-D tensor of timesteps (one per row)."""


def cfg_epsilon(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``eps_u + g * (eps_c - eps_u)``."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class GuidedEpsilon(nn.Module):
    """``eps(x_t, t, cond)`` of a conditional UNet with classifier-free guidance; counts the UNet rows it
    runs.

    ``cond`` holds ``"embeds"`` ``[B, L, D]`` and ``"uncond"`` (the empty prompt's states, ``[B, L, D]``).
    With guidance, one UNet call runs ``[uncond; cond]`` stacked: ``2 B`` rows. The UNet runs in its own
    dtype (``runtime.dtype`` for a frozen reference); epsilon comes back in ``x``'s dtype.

    ``forward`` (default: ``unet`` itself) is what is called, e.g. a compiled UNet
    (``composition.compile``); it takes and returns what ``unet`` does.
    """

    def __init__(self, unet, guidance_scale: float, forward=None):
        super().__init__()
        self.unet = unet
        self.guidance_scale = guidance_scale
        self.rows = 0
        self._call = forward if forward is not None else unet

    @property
    def rows_per_image(self) -> int:
        """UNet rows per image and evaluation: 2 with guidance, 1 without."""
        return 1 if self.guidance_scale == 1.0 else 2

    def count_backward(self, images: int) -> None:
        """A backward pass through the UNet for ``images`` images costs two forward evaluations
        (docs/design.md §3.8): ``2 * rows_per_image * images`` rows."""
        self.rows += 2 * self.rows_per_image * images

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        embeds, uncond = cond["embeds"], cond["uncond"]
        self.rows += self.rows_per_image * x.shape[0]
        dtype = getattr(self.unet, "dtype", x.dtype)
        if self.guidance_scale == 1.0:
            eps = self._call(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype)).sample
            return eps.to(x.dtype, copy=True)  # a copy: a CUDA-graphed forward reuses its output buffer
        out = self._call(
            torch.cat([x, x]).to(dtype),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond, embeds]).to(dtype),
        )
        eps_uncond, eps_cond = out.sample.to(x.dtype).chunk(2)
        return cfg_epsilon(eps_cond, eps_uncond, self.guidance_scale)


class GaussianStepPolicy(nn.Module):
    """``pi(x_prev | x_t, c) = N(ddim_mean(eps_model), sigma_t^2 * exp(v[t]))`` over a
    :class:`DDIMSchedule`."""

    def __init__(
        self, eps_model: EpsilonModel, schedule: DDIMSchedule, log_variance: LogVarianceOffset | None
    ):
        super().__init__()
        self.eps_model = eps_model
        self.schedule = schedule
        self.log_variance = log_variance

    def epsilon(self, x_t: torch.Tensor, step: int, cond) -> torch.Tensor:
        return self.eps_model(x_t, self.schedule.timestep(step, x_t), cond)

    def forward(self, x_t: torch.Tensor, step: int, cond) -> GaussianStep:
        """The step kernel at state ``(cond, t_step, x_t)``."""
        offset = None if self.log_variance is None else self.log_variance.values
        return self.schedule.kernel(x_t, self.epsilon(x_t, step, cond), step, offset)
