"""Images as the project passes them, ``[N, C, H, W]`` tensors in [0, 1], and as the pixels PIL reads."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] to ``[N, H, W, C]`` uint8 pixels on the CPU, ``round(255 * clamp(x, 0, 1))``
    as diffusers' ``numpy_to_pil`` rounds: the one conversion for PNG files, grids and rewards that read
    pixels."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
