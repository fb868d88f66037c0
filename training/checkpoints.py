"""The trainer's record and checkpoints: what each iteration logs (:class:`IterationMetrics`), the best
checked weights (:class:`BestKernel`), and checkpoints written atomically (safetensors + JSON, no pickle) and
read back for an exact resume. ``problem`` is a :class:`~training.trainer.StepProblem` (its
``trainable_state`` and ``load_trainable_state``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from configs.errors import MsddaError, first_line
from training.storage import raise_unless_content_fault, staged_directory


@dataclass
class IterationMetrics:
    iteration: int
    loss: float
    reward_mean: float
    reward_std: float
    kl: float
    unet_evaluations: int
    seconds: float
    skipped: bool = False
    ess_share: float = math.nan
    """Effective sample size share ``1 / (N sum_j w_j^2)`` of the target weights ``softmax(r / beta)``, mean
    over states: near 1, the target is a mild tilt of the actions; near ``1/N``, one action carries it."""
    reward_spread: float = math.nan
    """Standard deviation of the step reward over the ``N`` actions of a state, mean over states."""
    kernel_error: float = math.nan
    """The held-out kernel check's path error (:mod:`training.step.kernel_check`) after this iteration; NaN at
    iterations it did not run."""
    kernel_cosine: float = math.nan


@dataclass
class BestKernel:
    """The checked iteration with the lowest kernel error so far, and its trainable weights."""

    iteration: int
    kernel_error: float
    kernel_cosine: float
    state: dict[str, torch.Tensor]


CHECKPOINT_FILES = ("checkpoint.safetensors", "checkpoint.json")  # tensors; iteration, param groups, history


def save_checkpoint(
    directory: Path,
    problem,
    optimizer,
    generator,
    iteration: int,
    history,
    best: BestKernel | None = None,
) -> None:
    """Atomically write trainable weights, optimizer moments, RNG state and the best checked weights
    (safetensors + JSON, no pickle)."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in problem.trainable_state().items()}
    if best is not None:
        tensors.update({f"best.{k}": v.contiguous().cpu() for k, v in best.state.items()})
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
        for g in opt_state["param_groups"]
    ]
    meta = {"iteration": iteration, "param_groups": groups, "history": [m.__dict__ for m in history]}
    if best is not None:
        meta["best"] = {k: getattr(best, k) for k in ("iteration", "kernel_error", "kernel_cosine")}
    weights, info = CHECKPOINT_FILES
    with staged_directory(directory, prefix=".ckpt-") as tmp:
        save_file(tensors, tmp / weights)
        (tmp / info).write_text(json.dumps(meta))


class CheckpointError(MsddaError, RuntimeError):
    """A training checkpoint that is missing a file, unreadable or does not fit the run (one line)."""


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint, or part of one."""
    return any((directory / name).exists() for name in CHECKPOINT_FILES)


def _read_checkpoint(directory: Path, problem, iterations: int) -> tuple[dict, dict, int, list]:
    """``(tensors, metadata, iteration, history)`` of the checkpoint in ``directory``, checked against
    ``problem``'s trainable state and the run's ``iterations``; a file that is missing, does not parse, holds
    other shapes, or an iteration outside ``0..iterations`` or other than its history's, raises
    :class:`CheckpointError` naming it, one the OS cannot read now (permission denied, an I/O error) a
    :class:`~training.storage.ModelLoadError`: that is no damage, and the checkpoint must be kept."""
    from safetensors import SafetensorError

    weights, info = (directory / name for name in CHECKPOINT_FILES)
    path = weights
    try:
        tensors = load_file(weights)
        expected = {k: v.shape for k, v in problem.trainable_state().items()}
        stored = {k[6:]: v.shape for k, v in tensors.items() if k.startswith("model.")}
        if stored != expected or not {"rng.generator", "rng.torch"} <= tensors.keys():
            raise ValueError("its tensors do not match this run's trainable state")
        path = info
        meta = json.loads(info.read_text())
        history = [IterationMetrics(**m) for m in meta["history"]]
        iteration = _checked_iteration(meta["iteration"], history, iterations)
        return tensors, meta, iteration, history
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as exc:
        raise_unless_content_fault(exc, path)
        raise CheckpointError(f"the training checkpoint {path} is damaged ({first_line(exc)})") from None


def _checked_iteration(iteration, history: list[IterationMetrics], iterations: int) -> int:
    """The checkpoint's ``iteration`` when it is one a run of ``iterations`` saves: within
    ``0..iterations`` and the count of its history's iterations ``1..iteration``; else ``ValueError``."""
    if type(iteration) is not int or not 0 <= iteration <= iterations:
        raise ValueError(f"its iteration {iteration!r} is not one of this run's 0..{iterations}")
    if [m.iteration for m in history] != list(range(1, iteration + 1)):
        raise ValueError(f"its iteration {iteration} does not match its history of {len(history)} iterations")
    return iteration


def load_checkpoint(
    directory: Path, problem, optimizer, generator, iterations: int
) -> tuple[int, list, BestKernel | None]:
    """Restore the checkpoint in ``directory`` into ``problem``, ``optimizer`` and the RNGs; returns
    ``(iteration, history, the best checked weights or None)``. A damaged checkpoint (one that also names an
    iteration a run of ``iterations`` never saves) raises :class:`CheckpointError` (one line); the state is
    then only partly restored when the optimizer's or an RNG's state does not fit."""
    tensors, meta, iteration, history = _read_checkpoint(directory, problem, iterations)
    problem.load_trainable_state({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = None
    if "best" in meta:
        best = BestKernel(
            **meta["best"], state={k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        )
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"the training checkpoint in {directory} does not fit this run ({first_line(exc)})"
        ) from None
    return iteration, history, best
