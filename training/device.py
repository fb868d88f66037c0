"""The device and dtype a :class:`~configs.schema.RuntimeConfig` names, resolved once per command."""

from __future__ import annotations

import functools
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


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask, which container limits and ``taskset`` set)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))  # not on Linux


def busy_cpus(cpus: set[int], seconds: float = 0.25) -> float:
    """How many of ``cpus`` other work keeps busy: their non-idle share over ``seconds``, from ``/proc/stat``
    (0 where there is none)."""
    import time

    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(field) for field in fields]
                    times[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])  # total, idle + iowait
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except OSError:
        return 0.0
    busy = 0.0
    for cpu, (total, idle) in after.items():
        elapsed = total - before[cpu][0]
        busy += (elapsed - (idle - before[cpu][1])) / elapsed if elapsed > 0 else 0.0
    return busy


@functools.cache
def free_cpus() -> int:
    """The usable CPUs that other work is not keeping busy, measured once per process (at least one)."""
    cpus = usable_cpus()
    return max(1, round(len(cpus) - busy_cpus(cpus)))


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count and return it: ``requested`` when positive, else ``OMP_NUM_THREADS``
    when set, else :func:`free_cpus` (decided once per process, so every stage of a run uses the same count).

    On a busy machine fewer threads are faster: torch's threads wait for each other at every operation, and
    one that has lost its core stalls the rest (``benchmarks/threads_under_load.py``; docs/operations.md).
    """
    import os

    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested > 0:
        threads = requested
    elif from_env.isdigit() and int(from_env) > 0:
        threads = int(from_env)
    else:
        threads = free_cpus()
    torch.set_num_threads(threads)
    return threads
