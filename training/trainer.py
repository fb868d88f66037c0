"""The step-level KL-regularised RL trainer (docs/design.md §1.5), shared by the UNet and the 2-D toy.

Per visited state ``s = (c, t, x_t)`` the target is ``pi*(a|s) ∝ p_ref(a|s) exp(r(s, a) / beta)``. Two
estimators:

* ``target_matching`` (default; the M-projection): draw ``N`` actions from ``p_ref``, self-normalise
  ``w_j ∝ exp(r_j / beta)`` and minimise ``-sum_j w_j log pi_theta(a_j|s)``. Its minimiser over Gaussians
  matches the weighted mean and variance, i.e. ``pi*``'s moments.
* ``policy_gradient``: draw ``G`` actions from ``pi_theta``, ``A_j = r_j - mean(r)`` and minimise
  ``-mean_j A_j log pi_theta(a_j|s) + beta * KL(pi_theta(.|s) || p_ref(.|s))`` with the analytic Gaussian KL.

States come from rollouts of the current policy, or from a fixed pool of reference chains
(``train.states``). Losses are divided by the action dimension so learning rates
transfer across problem sizes.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from configs.schema import TrainConfig
from training.checkpoints import (
    BestKernel,
    CheckpointError,
    IterationMetrics,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.distributed import (
    average_gradients,
    broadcast_from_main,
    make_accelerator,
    release_accelerate_state,
)
from training.step.chain import run_chain
from training.step.kernel import GaussianStep, draw_noise
from training.step.policy import GaussianStepPolicy


class StepProblem(Protocol):
    """What the trainer needs from a model + reward pair (``training.analysis.toy``, ``training.sd_problem``).

    Problems are ``torch.nn.Module``s: the trainer moves them with ``to`` and optimises ``parameters()`` that
    require grad (the policy's trainable part; everything else is frozen).
    """

    policy: GaussianStepPolicy
    unet_evaluations: int
    """UNet rows evaluated so far (settable, so a resumed run continues the count)."""

    def initial_states(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, object]: ...

    def reference(self, x_t: torch.Tensor, step: int, cond: object) -> GaussianStep: ...

    def step_reward(self, x_t: torch.Tensor, actions: torch.Tensor, step: int, cond: object) -> torch.Tensor:
        """``r(s, a)`` for ``actions`` of shape ``[N, B, ...]`` at states ``x_t`` ``[B, ...]``; returns
        ``[N, B]``."""
        ...

    def exact_step_optimum(
        self, x_t: torch.Tensor, step: int, cond: object, beta: float
    ) -> GaussianStep | None:
        """``pi*`` in closed form at the states ``x_t``, where the problem knows it; else ``None``."""
        ...

    def count_reward_gradient(self, states: int, step: int) -> None:
        """Add the UNet rows of one reward gradient at ``states`` states of ``step`` to
        ``unet_evaluations``: a backward pass through the UNet costs two forwards, one through the decoder and
        reward alone none (docs/design.md §3.8)."""
        ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def to(self, device) -> StepProblem: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


@dataclass
class TrainResult:
    iterations: int
    history: list[IterationMetrics] = field(default_factory=list)
    seconds: float = 0.0
    kernel_check: dict | None = None
    """With ``train.eval_every``: ``{"kernel_error", "kernel_cosine", "iteration", "exact", "missing"}`` of
    the weights returned (the best checked iteration's), else ``None``."""


# ----------------------------------------------------------------------------------------------- the losses


def target_weights(rewards: torch.Tensor, beta: float, log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Self-normalised weights of ``pi* ∝ p_ref exp(r / beta)`` over actions ``a_j ~ q``, ``[N, B]``:

        w_j = softmax_j(r_j / beta + log p_ref(a_j) - log q(a_j))

    ``log_ratio`` is ``log p_ref - log q``, ``None`` when ``q = p_ref``."""
    logits = rewards / beta
    return torch.softmax(logits if log_ratio is None else logits + log_ratio, dim=0)


def linearised_proposal(
    reference: GaussianStep,
    reward_gradient: torch.Tensor,
    beta: float,
    kappa: float,
    curvature: torch.Tensor | None = None,
) -> GaussianStep:
    """``q = N(mu_ref + kappa * var_ref * grad r / beta, var_ref)``: the reference moved by the share
    ``kappa`` of the linearised optimum's drift (for ``r(a) = r(mu_ref) + g·(a - mu_ref)``, ``pi*`` is
    exactly ``N(mu_ref + var_ref g / beta, var_ref)``). Then, up to a constant,

        log p_ref(a) - log q(a) = -kappa g·(a - mu_ref) / beta

    so the weights tilt only by what the linear part does not explain.

    With a ``curvature`` ``h >= 0`` per state (``[B]``, of ``-r`` along the action), the Laplace step
    ``q = N(mu_ref + kappa v g / beta, v)`` with ``v = 1 / (1 / var_ref + h / beta)``: for
    ``r(a) = r(mu_ref) + g·(a - mu_ref) - h/2 |a - mu_ref|^2`` that is ``pi*`` exactly at ``kappa = 1``."""
    variance = reference.variance
    if curvature is not None:
        h = curvature.clamp(min=0).view(-1, *([1] * (reference.mean.dim() - 1))).to(reference.mean)
        variance = 1 / (1 / reference.variance + h / beta)
    shift = kappa * variance * reward_gradient / beta
    return GaussianStep(reference.mean + shift, variance)


def step_reward_curvature(
    problem: StepProblem, x_t, reference: GaussianStep, step: int, cond, generator: torch.Generator
) -> torch.Tensor:
    """The reward's curvature along one random direction per state, ``[B]``:

        h = -(r(mu + d) + r(mu - d) - 2 r(mu)) / |d|^2,   d = sigma_t z,  z ~ N(0, I)

    exact for any direction when ``r`` is an isotropic quadratic in the action."""
    direction = reference.std * draw_noise(reference.mean.shape, generator, reference.mean)
    points = torch.stack([reference.mean, reference.mean + direction, reference.mean - direction])
    with torch.no_grad():
        r = problem.step_reward(x_t, points, step, cond).double()
    squared = (direction.double() ** 2).flatten(1).sum(1)
    return (-(r[1] + r[2] - 2 * r[0]) / squared).float()


def step_reward_gradient(problem: StepProblem, x_t, action: torch.Tensor, step: int, cond) -> torch.Tensor:
    """``grad_a r(s, a)`` at ``action`` (``[B, ...]``), through whatever the step reward computes."""
    with torch.enable_grad():
        point = action.detach().unsqueeze(0).requires_grad_(True)
        rewards = problem.step_reward(x_t, point, step, cond)
        if not rewards.requires_grad:
            raise ValueError("train.gradient_proposal needs a differentiable reward")
        (gradient,) = torch.autograd.grad(rewards.sum(), point)
    return gradient[0]


def target_matching_loss(
    policy: GaussianStep, actions, weights: torch.Tensor, reference: GaussianStep | None = None
) -> torch.Tensor:
    """``-sum_j w_j log pi_theta(a_j|s)`` with the :func:`target_weights` ``w`` ``[N, B]``, averaged over
    states, per action dimension (``train.target_loss: likelihood``). Its gradient in the mean is
    ``(mu_theta - sum_j w_j a_j) / sigma_theta^2``: a step whose learned variance is narrow pulls hardest.

    With a ``reference`` (``train.target_loss: regression``) the mean is regressed with the reference's
    variance instead, and the variance fitted by the likelihood at the mean held fixed:

        sum_j w_j |a_j - mu_theta|^2 / (2 sigma_t^2)  +  (-sum_j w_j log N(a_j; sg(mu_theta), sigma_theta^2))

    whose mean gradient ``(mu_theta - sum_j w_j a_j) / sigma_t^2`` is that of the path KL's weighting of a
    mean error (docs/design.md §1.5), whatever the learned variance."""
    weights = weights.detach()
    if reference is None:
        log_probs = torch.stack([policy.log_prob(action) for action in actions])
        return -(weights * log_probs).sum(0).mean() / policy.mean[0].numel()
    fixed_mean = GaussianStep(policy.mean.detach(), policy.variance)
    squared = torch.stack([(action - policy.mean).pow(2).flatten(1).sum(1) for action in actions])
    variance = reference.variance.expand_as(policy.mean).flatten(1)[:, 0]  # sigma_t^2 is one per row
    mean_term = (weights * squared).sum(0) / (2 * variance)
    variance_term = -(weights * torch.stack([fixed_mean.log_prob(action) for action in actions])).sum(0)
    return (mean_term + variance_term).mean() / policy.mean[0].numel()


def policy_gradient_loss(policy: GaussianStep, actions, rewards, reference: GaussianStep, beta: float):
    """``-mean_j (r_j - mean r) log pi_theta(a_j|s) + beta * KL(pi_theta || p_ref)``, per action dimension."""
    advantages = (rewards - rewards.mean(0, keepdim=True)).detach()
    log_probs = torch.stack([policy.log_prob(action) for action in actions])
    kl = policy.kl(reference)
    return (-(advantages * log_probs).mean(0) + beta * kl).mean() / policy.mean[0].numel()


# ------------------------------------------------------------------------------------------------- rollouts


@torch.no_grad()
def rollout_states(problem: StepProblem, batch_size: int, steps: list[int], generator: torch.Generator):
    """Run the current policy from ``x_T``; return ``{step: x_t}`` for the requested steps, and ``cond``."""
    x_T, cond = problem.initial_states(batch_size, generator)
    chain = run_chain(
        problem.policy.schedule,
        x_T,
        lambda x, step: problem.policy(x, step, cond),
        generator,
        stop=max(steps),
        keep=steps,
        diagnose=False,
    )
    return chain.states, cond


POOL_SEED_OFFSET = 7_919
"""The reference pool's generator is seeded ``train.seed + POOL_SEED_OFFSET`` (+ the process index)."""


@torch.no_grad()
def reference_pool(problem: StepProblem, config: TrainConfig, seed: int) -> list[tuple[dict, object]]:
    """``train.states: reference_pool``: ``pool_batches`` batches of ``batch_size`` reference chains, each as
    ``({step: x_t} for every step, cond)``; drawn from a generator of its own seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    schedule = problem.policy.schedule
    pool = []
    for _ in tqdm(range(config.pool_batches), desc="reference pool", leave=False, disable=None):
        x_T, cond = problem.initial_states(config.batch_size, generator)
        chain = run_chain(
            schedule,
            x_T,
            lambda x, step, cond=cond: problem.reference(x, step, cond),
            generator,
            keep=range(len(schedule)),
            diagnose=False,
        )
        pool.append((chain.states, cond))
    return pool


# -------------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainingRun:
    """The live state of one :func:`train` call."""

    accelerator: object
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    trainable: list[torch.nn.Parameter]
    start_iteration: int
    history: list[IterationMetrics]
    pool: list[tuple[dict, object]] | None = None
    """The reference pool of ``train.states: reference_pool`` or ``mixed`` (:func:`reference_pool`), else
    ``None``."""
    best: BestKernel | None = None
    """The best checked weights so far (``train.eval_every``), restored on resuming."""


def make_optimizer(problem: StepProblem, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the log-variance offset gets ``variance_lr_scale`` times the learning rate."""
    variance = (
        list(problem.policy.log_variance.parameters()) if problem.policy.log_variance is not None else []
    )
    ids = {id(p) for p in variance}
    others = [p for p in problem.parameters() if p.requires_grad and id(p) not in ids]
    rates = group_learning_rates(config)
    groups = [{"params": others, "lr": rates[0]}]
    if variance:
        groups.append({"params": variance, "lr": rates[1]})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def group_learning_rates(config: TrainConfig) -> tuple[float, float]:
    """Unscheduled learning rates of :func:`make_optimizer`'s groups: the rest, the log-variance offset."""
    return config.learning_rate, config.learning_rate * config.variance_lr_scale


def learning_rate_factor(config: TrainConfig, iteration: int) -> float:
    """The schedule's share of each group's learning rate at ``iteration`` (0-based):
    ``(1 + cos(pi i / n)) / 2`` for ``cosine``, 1 for ``constant``. A function of the iteration alone, so a
    resumed run continues it exactly."""
    if config.learning_rate_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * iteration / config.iterations))


def setup_run(
    problem: StepProblem,
    config: TrainConfig,
    checkpoint_dir: Path | None,
    device: torch.device | str | None = None,
) -> TrainingRun:
    """Accelerator (on ``device``, see :func:`training.distributed.make_accelerator`), seeds, optimizer and
    (if a checkpoint is there) the resumed state."""
    accelerator = make_accelerator(config, device)
    # Each process draws its own states (seed + rank); gradients are averaged across processes.
    seed = config.seed + accelerator.process_index
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    problem.to(accelerator.device)
    optimizer = make_optimizer(problem, config)
    start, history, best = 0, [], None
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        initial = {k: v.detach().clone() for k, v in problem.trainable_state().items()}
        try:
            start, history, best = load_checkpoint(
                checkpoint_dir, problem, optimizer, generator, config.iterations
            )
        except CheckpointError as exc:  # start over exactly as a run without it would
            print(f"warning: {exc}; discarding it and training from scratch", file=sys.stderr)
            if accelerator.is_main_process:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            problem.load_trainable_state(initial)
            torch.manual_seed(seed)
            generator.manual_seed(seed)
            optimizer = make_optimizer(problem, config)
        else:
            print(f"resuming from the checkpoint at iteration {start} in {checkpoint_dir}", file=sys.stderr)
    pool = None
    if config.states in ("reference_pool", "mixed"):
        pool = reference_pool(problem, config, config.seed + POOL_SEED_OFFSET + accelerator.process_index)
    if history:  # the count so far, the pool's cost included once (a resumed run rebuilds the same pool)
        problem.unet_evaluations = history[-1].unet_evaluations
    optimizer = accelerator.prepare(optimizer)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if start == 0:
        broadcast_from_main(accelerator, trainable)
    return TrainingRun(accelerator, optimizer, generator, trainable, start, history, pool, best)


class StepOutcome(NamedTuple):
    loss: torch.Tensor
    rewards: torch.Tensor
    """``[N, B]``"""
    kl: float
    """``KL(policy || reference)``, mean over the states"""
    weights: torch.Tensor
    """the target's weights over the actions, ``[N, B]``"""


def step_loss(problem: StepProblem, config: TrainConfig, run: TrainingRun, x_t, step: int, cond):
    """The :class:`StepOutcome` at the states ``x_t`` of ``step``; ``None`` when a reward is not finite."""
    with torch.no_grad():
        reference = problem.reference(x_t, step, cond)
    with run.accelerator.autocast():
        policy = problem.policy(x_t, step, cond)
    policy = policy.float()
    proposal = reference if config.method == "target_matching" else policy.detach()
    log_ratio = None
    if config.gradient_proposal:
        gradient = step_reward_gradient(problem, x_t, reference.mean, step, cond).float()
        problem.count_reward_gradient(len(x_t), step)
        curvature = None
        if config.curvature_proposal:
            curvature = step_reward_curvature(problem, x_t, reference, step, cond, run.generator)
        proposal = linearised_proposal(reference, gradient, config.beta, config.gradient_proposal, curvature)
    actions = proposal.sample(run.generator, num=config.num_actions, antithetic=config.antithetic)
    with torch.no_grad():
        rewards = problem.step_reward(x_t, actions, step, cond).float()
        if config.gradient_proposal:
            log_ratio = torch.stack([reference.log_prob(a) - proposal.log_prob(a) for a in actions])
    if not torch.isfinite(rewards).all():
        return None
    weights = target_weights(rewards, config.beta, log_ratio)
    if config.method == "target_matching":
        regress = config.target_loss == "regression"
        loss = target_matching_loss(policy, actions, weights, reference if regress else None)
    else:
        loss = policy_gradient_loss(policy, actions, rewards, reference, config.beta)
    return StepOutcome(loss, rewards, policy.detach().kl(reference).mean().item(), weights)


def apply_update(run: TrainingRun, total: torch.Tensor, config: TrainConfig) -> None:
    """Backward, average gradients across processes, clip, step."""
    accelerator = run.accelerator
    accelerator.backward(total)
    average_gradients(accelerator, run.trainable)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def train_iteration(
    problem: StepProblem, config: TrainConfig, run: TrainingRun, iteration: int, clock: float
) -> IterationMetrics:
    """One iteration: roll out states or take a batch of the reference pool (``train.states``), sum the step
    losses over the sampled steps, update."""
    num_steps = len(problem.policy.schedule)
    steps = sorted(
        torch.randperm(num_steps, generator=run.generator)[: config.states_per_trajectory].tolist()
    )
    if run.pool is None or (config.states == "mixed" and iteration % 2 == 0):
        states, cond = rollout_states(problem, config.batch_size, steps, run.generator)
    else:
        states, cond = run.pool[int(torch.randint(len(run.pool), (), generator=run.generator))]
    outcomes = []
    with run.accelerator.accumulate(problem):
        for step in steps:
            outcome = step_loss(problem, config, run, states[step], step, cond)
            if outcome is None:
                break
            outcomes.append(outcome)
        skipped = len(outcomes) < len(steps)
        if skipped:
            warnings.warn(f"iteration {iteration}: non-finite rewards, batch skipped", RuntimeWarning)
            run.optimizer.zero_grad(set_to_none=True)
        else:
            total = sum(outcome.loss / len(steps) for outcome in outcomes)
            factor = learning_rate_factor(config, iteration)
            for group, rate in zip(run.optimizer.param_groups, group_learning_rates(config)):
                group["lr"] = rate * factor
            apply_update(run, total, config)
    return _metrics(problem, iteration, outcomes, None if skipped else total.detach().item(), clock)


def target_diagnostics(rewards: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """``(ESS share of the target weights, reward spread over actions)`` for rewards and weights ``[N, B]``,
    means over the ``B`` states."""
    ess = 1.0 / (len(rewards) * (weights**2).sum(0))
    return float(ess.mean()), float(rewards.std(0).mean())


def _metrics(
    problem: StepProblem, iteration: int, outcomes: list[StepOutcome], loss: float | None, clock: float
):
    skipped = loss is None
    seen = torch.cat([o.rewards.flatten() for o in outcomes]) if not skipped else torch.tensor([math.nan])
    diagnostics = [target_diagnostics(o.rewards, o.weights) for o in outcomes] if not skipped else []
    ess, spread = (
        [sum(values) / len(values) for values in zip(*diagnostics)] if diagnostics else (math.nan, math.nan)
    )
    return IterationMetrics(
        iteration=iteration + 1,
        loss=math.nan if skipped else loss,
        reward_mean=float(seen.mean()),
        reward_std=float(seen.std()) if seen.numel() > 1 else 0.0,
        kl=sum(o.kl for o in outcomes) / len(outcomes) if not skipped else math.nan,
        unet_evaluations=problem.unet_evaluations,
        seconds=time.perf_counter() - clock,
        skipped=skipped,
        ess_share=ess,
        reward_spread=spread,
    )


def train(
    problem: StepProblem,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    log_metrics: Callable[[IterationMetrics], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Run ``config.iterations`` trainer iterations (resuming from ``checkpoint_dir`` if one is there) on
    ``device`` (see :func:`setup_run`); the problem is moved there."""
    run = setup_run(problem, config, checkpoint_dir, device)
    history, start = run.history, run.start_iteration
    check = held_out_check(problem, config)
    clock = time.perf_counter() - (history[-1].seconds if history else 0.0)
    end = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    bar = tqdm(range(start, end), desc="train", disable=not progress, initial=start, total=config.iterations)
    for iteration in bar:
        metrics = train_iteration(problem, config, run, iteration, clock)
        if check is not None and _check_due(config, iteration + 1):
            _run_check(problem, check, run, metrics)
        history.append(metrics)
        if log_metrics is not None:
            log_metrics(metrics)
        bar.set_postfix(_postfix(metrics, run.best), refresh=False)
        due = config.checkpoint_every and (iteration + 1) % config.checkpoint_every == 0
        if checkpoint_dir is not None and due and run.accelerator.is_main_process:
            save_checkpoint(
                checkpoint_dir, problem, run.optimizer, run.generator, iteration + 1, history, run.best
            )
    bar.close()
    release_accelerate_state()
    kernel_check = None
    if check is not None and len(history) == config.iterations:
        kernel_check = {"exact": check.exact, "missing": check.missing, "iteration": None}
        kernel_check |= {"kernel_error": math.nan, "kernel_cosine": math.nan}
        if run.best is not None:  # the weights kept are the best checked iteration's
            problem.load_trainable_state(run.best.state)
            kernel_check |= {k: getattr(run.best, k) for k in ("iteration", "kernel_error", "kernel_cosine")}
    seconds = time.perf_counter() - clock
    return TrainResult(len(history), history, seconds, kernel_check)


def held_out_check(problem: StepProblem, config: TrainConfig):
    """The :class:`~training.step.kernel_check.KernelCheck` of ``train.eval_every`` (``None`` when 0); a check
    that cannot run is said once on stderr, and training goes on."""
    if not config.eval_every:
        return None
    from training.step.kernel_check import CHECK_SEED_OFFSET, KernelCheck

    seed = config.eval_seed + CHECK_SEED_OFFSET
    check = KernelCheck.build(
        problem, config.kernel_check_chains, config.kernel_check_actions, config.beta, seed
    )
    if check.missing is not None:
        print(f"warning: the kernel check is missing ({check.missing}); training goes on", file=sys.stderr)
    return check


def _check_due(config: TrainConfig, done: int) -> bool:
    return done % config.eval_every == 0 or done == config.iterations


def _run_check(problem: StepProblem, check, run: TrainingRun, metrics: IterationMetrics) -> None:
    """Run the kernel check into ``metrics``; keep the weights when they are the best so far."""
    figures = check(problem)
    metrics.kernel_error, metrics.kernel_cosine = figures["kernel_error"], figures["kernel_cosine"]
    error = metrics.kernel_error
    if math.isfinite(error) and (run.best is None or error < run.best.kernel_error):
        state = {k: v.detach().clone() for k, v in problem.trainable_state().items()}
        run.best = BestKernel(metrics.iteration, error, metrics.kernel_cosine, state)


def _postfix(metrics: IterationMetrics, best: BestKernel | None) -> dict[str, str]:
    postfix = {"reward": f"{metrics.reward_mean:.3f}", "kl": f"{metrics.kl:.3g}"}
    if best is not None:
        postfix["kernel"] = f"{best.kernel_error:.3f}@{best.iteration}"
    return postfix
