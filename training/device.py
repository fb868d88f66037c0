"""The device and dtype a :class:`~configs.schema.RuntimeConfig` names, resolved once per command."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from configs.errors import MsddaError

if TYPE_CHECKING:
    from configs.schema import RuntimeConfig


class DeviceError(MsddaError):
    """A device that this machine does not have (one line, exit 2 from the CLI)."""


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cuda`` without CUDA raises :class:`DeviceError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for, but torch sees no CUDA device on this machine")
    return torch.device(name)


def resolve_dtype(name: str = "fp32") -> torch.dtype:
    return DTYPES[name]


def resolve_runtime(runtime: RuntimeConfig) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` of a config's ``runtime`` section; :class:`DeviceError` for a missing device."""
    return resolve_device(runtime.device), resolve_dtype(runtime.dtype)


def place_pipeline(pipe, device: torch.device, dtype: torch.dtype = torch.float32):
    """Move a diffusers pipeline's models (UNet, VAE, text encoder and whatever else it holds, adapters
    included) to ``device`` and cast their floating-point weights to ``dtype``; returns ``pipe``."""
    return pipe.to(device=device, dtype=dtype)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which container limits and ``taskset`` set)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count and return it: ``requested`` when positive, else ``OMP_NUM_THREADS``
    when set, else :func:`available_cpus`."""
    import os

    threads = requested
    if threads <= 0:
        from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else available_cpus()
    torch.set_num_threads(threads)
    return threads
