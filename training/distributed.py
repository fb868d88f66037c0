"""Processes and devices for one training run, through accelerate: the accelerator, rank 0's weights on
every process, gradients averaged across processes, and accelerate's per-run state released afterwards.

On one process (the default, and every test on the CPU) each helper is a no-op beyond what accelerate
itself does; under ``accelerate launch`` each process takes its own GPU and draws its own states.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from configs.schema import TrainConfig


def make_accelerator(config: TrainConfig, device: torch.device | str | None = None) -> Accelerator:
    """The run's accelerator: ``config``'s mixed precision and gradient accumulation on ``device``
    (``runtime.device`` resolved, :func:`training.device.resolve_device`; ``None``: ``auto``)."""
    from accelerate import Accelerator

    from training.device import resolve_device

    device = resolve_device("auto") if device is None else torch.device(device)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=device.type == "cpu",
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )


def broadcast_from_main(accelerator: Accelerator, parameters: Iterable[torch.Tensor]) -> None:
    """Every process starts from rank 0's weights (in place; nothing to do on one process)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(broadcast(parameter.detach().clone(), from_process=0))


def average_gradients(accelerator: Accelerator, parameters: Iterable[torch.Tensor]) -> None:
    """Each gradient replaced by its mean across processes, once per optimizer step (at a gradient-sync
    boundary; nothing to do on one process)."""
    if not accelerator.sync_gradients or accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def release_accelerate_state() -> None:
    """Drop accelerate's per-run singletons (mixed precision, accumulation) so the next run in this process,
    ours or another library's, can choose its own; the distributed process state is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
