"""The step-level KL-regularised RL trainer (DESIGN section 2), shared by the UNet and the 2-D toy.

Per visited state ``s = (c, t, x_t)`` the target is ``pi*(a|s) ∝ p_ref(a|s) exp(r(s, a) / beta)``. Two estimators:

* ``target_matching`` (default; the M-projection): draw ``N`` actions from ``p_ref``, self-normalise
  ``w_j ∝ exp(r_j / beta)`` and minimise ``-sum_j w_j log pi_theta(a_j|s)``. Its minimiser over Gaussians matches
  the weighted mean and variance, i.e. ``pi*``'s moments.
* ``policy_gradient``: draw ``G`` actions from ``pi_theta``, ``A_j = r_j - mean(r)`` and minimise
  ``-mean_j A_j log pi_theta(a_j|s) + beta * KL(pi_theta(.|s) || p_ref(.|s))`` with the analytic Gaussian KL.

States come from rollouts of the current policy. Losses are divided by the action dimension so learning rates
transfer across problem sizes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from configs.schema import TrainConfig
from training.policy import GaussianStepPolicy, gaussian_kl, gaussian_log_prob


class StepProblem(Protocol):
    """What the trainer needs from a model + reward pair (see ``training.toy`` and ``training.sd_problem``)."""

    policy: GaussianStepPolicy

    def initial_states(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, object]: ...

    def reference(self, x_t: torch.Tensor, step: int, cond: object) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step_reward(self, x_t: torch.Tensor, actions: torch.Tensor, step: int, cond: object) -> torch.Tensor:
        """``r(s, a)`` for ``actions`` of shape ``[N, B, ...]`` at states ``x_t`` ``[B, ...]``; returns ``[N, B]``."""
        ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    unet_evaluations: int
    """UNet rows evaluated so far (settable, so a resumed run continues the count)."""


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


@dataclass
class TrainResult:
    iterations: int
    history: list[IterationMetrics] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- the losses


def target_matching_loss(policy_mean, policy_var, actions, rewards, beta: float) -> torch.Tensor:
    """``-sum_j softmax(r / beta)_j log pi_theta(a_j|s)``, averaged over states, per action dimension."""
    weights = torch.softmax(rewards / beta, dim=0)  # [N, B]
    n = actions.shape[0]
    log_probs = torch.stack([gaussian_log_prob(actions[j], policy_mean, policy_var) for j in range(n)])
    return -(weights.detach() * log_probs).sum(0).mean() / policy_mean[0].numel()


def policy_gradient_loss(policy_mean, policy_var, actions, rewards, ref_mean, ref_var, beta: float):
    """``-mean_j (r_j - mean r) log pi_theta(a_j|s) + beta * KL(pi_theta || p_ref)``, per action dimension."""
    advantages = (rewards - rewards.mean(0, keepdim=True)).detach()
    n = actions.shape[0]
    log_probs = torch.stack([gaussian_log_prob(actions[j], policy_mean, policy_var) for j in range(n)])
    kl = gaussian_kl(policy_mean, policy_var, ref_mean, ref_var)
    return (-(advantages * log_probs).mean(0) + beta * kl).mean() / policy_mean[0].numel()


# ------------------------------------------------------------------------------------------------- rollouts


@torch.no_grad()
def rollout_states(problem: StepProblem, batch_size: int, steps: list[int], generator: torch.Generator):
    """Run the current policy from ``x_T``; return ``{step: x_t}`` for the requested steps, and ``cond``."""
    x, cond = problem.initial_states(batch_size, generator)
    wanted, last = {}, max(steps)
    for step in range(last + 1):
        if step in steps:
            wanted[step] = x
        if step < last:
            x = problem.policy.sample(x, step, cond, generator)
    return wanted, cond


def _draw_actions(mean, var, n: int, generator) -> torch.Tensor:
    noise = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype).to(mean.device)
    return mean.unsqueeze(0) + var.sqrt().unsqueeze(0) * noise


# ------------------------------------------------------------------------------------------- checkpointing


def save_checkpoint(directory: Path, problem: StepProblem, optimizer, generator, iteration: int, history) -> None:
    """Atomically write trainable weights, optimizer moments and RNG state (safetensors + JSON, no pickle)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=directory.parent))
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in problem.trainable_state().items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / "checkpoint.safetensors")
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt_state["param_groups"]]
    meta = {"iteration": iteration, "param_groups": groups, "history": [m.__dict__ for m in history]}
    (tmp / "checkpoint.json").write_text(json.dumps(meta))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, problem: StepProblem, optimizer, generator) -> tuple[int, list]:
    tensors = load_file(directory / "checkpoint.safetensors")
    meta = json.loads((directory / "checkpoint.json").read_text())
    problem.load_trainable_state({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["iteration"], [IterationMetrics(**m) for m in meta["history"]]


# -------------------------------------------------------------------------------------------------- trainer


def make_optimizer(problem: StepProblem, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the log-variance offset gets ``variance_lr_scale`` times the learning rate."""
    variance = list(problem.policy.log_variance.parameters()) if problem.policy.log_variance is not None else []
    ids = {id(p) for p in variance}
    others = [p for p in problem.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": others, "lr": config.learning_rate}]
    if variance:
        groups.append({"params": variance, "lr": config.learning_rate * config.variance_lr_scale})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train(
    problem,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    log_metrics: Callable[[IterationMetrics], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Run ``config.iterations`` trainer iterations (resuming from ``checkpoint_dir`` if one is there)."""
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )
    # Each process draws its own states (seed + rank); gradients are averaged across processes below.
    torch.manual_seed(config.seed + accelerator.process_index)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    problem.to(accelerator.device)
    optimizer = make_optimizer(problem, config)
    start_iteration, history = 0, []
    if checkpoint_dir is not None and (checkpoint_dir / "checkpoint.json").exists():
        start_iteration, history = load_checkpoint(checkpoint_dir, problem, optimizer, generator)
        print(f"resuming from the checkpoint at iteration {start_iteration} in {checkpoint_dir}", file=sys.stderr)
        if history:
            problem.unet_evaluations = history[-1].unet_evaluations
    optimizer = accelerator.prepare(optimizer)
    num_steps = len(problem.policy.schedule)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if accelerator.num_processes > 1 and start_iteration == 0:  # every process starts from rank 0's weights
        from accelerate.utils import broadcast

        with torch.no_grad():
            for parameter in trainable:
                parameter.copy_(broadcast(parameter.detach().clone(), from_process=0))
    clock = time.perf_counter() - (history[-1].seconds if history else 0.0)
    end = config.iterations if stop_after is None else min(config.iterations, start_iteration + stop_after)
    bar = tqdm(range(start_iteration, end), desc="train", disable=not progress, initial=start_iteration,
               total=config.iterations)
    for iteration in bar:
        steps = sorted(torch.randperm(num_steps, generator=generator)[: config.states_per_trajectory].tolist())
        states, cond = rollout_states(problem, config.batch_size, steps, generator)
        losses, rewards_seen, kls, skipped = [], [], [], False
        with accelerator.accumulate(problem):
            total = 0.0
            for step in steps:
                x_t = states[step]
                with torch.no_grad():
                    ref_mean, ref_var = problem.reference(x_t, step, cond)
                with accelerator.autocast():
                    mean, var = problem.policy(x_t, step, cond)
                mean, var = mean.float(), var.float()
                sampler_mean, sampler_var = (ref_mean, ref_var) if config.method == "target_matching" else (
                    mean.detach(), var.detach())
                actions = _draw_actions(sampler_mean, sampler_var, config.num_actions, generator)
                with torch.no_grad():
                    rewards = problem.step_reward(x_t, actions, step, cond).float()
                if not torch.isfinite(rewards).all():
                    skipped = True
                    break
                if config.method == "target_matching":
                    loss = target_matching_loss(mean, var, actions, rewards, config.beta)
                else:
                    loss = policy_gradient_loss(mean, var, actions, rewards, ref_mean, ref_var, config.beta)
                total = total + loss / len(steps)
                rewards_seen.append(rewards.flatten())
                kls.append(gaussian_kl(mean.detach(), var.detach(), ref_mean, ref_var).mean().item())
            if skipped:
                warnings.warn(f"iteration {iteration}: non-finite rewards, batch skipped", RuntimeWarning)
                optimizer.zero_grad(set_to_none=True)
            else:
                accelerator.backward(total)
                if accelerator.sync_gradients and accelerator.num_processes > 1:
                    for parameter in trainable:
                        if parameter.grad is not None:
                            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total.detach().item())
        seen = torch.cat(rewards_seen) if rewards_seen and not skipped else torch.tensor([math.nan])
        metrics = IterationMetrics(
            iteration=iteration + 1,
            loss=losses[-1] if losses else math.nan,
            reward_mean=float(seen.mean()),
            reward_std=float(seen.std()) if seen.numel() > 1 else 0.0,
            kl=sum(kls) / len(kls) if kls and not skipped else math.nan,
            unet_evaluations=problem.unet_evaluations,
            seconds=time.perf_counter() - clock,
            skipped=skipped,
        )
        history.append(metrics)
        if log_metrics is not None:
            log_metrics(metrics)
        bar.set_postfix(reward=f"{metrics.reward_mean:.3f}", kl=f"{metrics.kl:.3g}", refresh=False)
        if (checkpoint_dir is not None and config.checkpoint_every and (iteration + 1) % config.checkpoint_every == 0
                and accelerator.is_main_process):
            save_checkpoint(checkpoint_dir, problem, optimizer, generator, iteration + 1, history)
    bar.close()
    _release_accelerate_state()
    return TrainResult(iterations=len(history), history=history, seconds=time.perf_counter() - clock)


def _release_accelerate_state() -> None:
    """Drop accelerate's per-run singletons (mixed precision, accumulation) so the next run in this process,
    ours or another library's, can choose its own; the distributed process state is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
