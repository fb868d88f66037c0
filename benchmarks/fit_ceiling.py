"""Fit ceiling: how close can each LoRA target set get to the exact step optimum, with no target noise?

    python benchmarks/step_optimality.py --config configs/quadratic.yaml --fit-ceiling [--json]

For each latent quadratic objective of the config (its optimum ``pi* ∝ p_ref exp(r / beta)`` is a Gaussian
known in closed form, :meth:`~training.sd_problem.DiffusionStepProblem.quadratic_optimum`) and each target
set and rank of ``--sets`` (default :data:`SETS`):

1. A fixed pool of ``--pool`` reference chains (every state of every DDIM step) and ``--held-out`` other
   reference chains, drawn from seeds apart from training's and evaluation's.
2. The optimum's mean ``mu*`` at every state.
3. Regress a fresh adapter (``train.lora_targets``, the trainer's own :class:`DiffusionStepProblem`) onto
   it: loss ``mean |mu_theta - mu*|^2 / sigma_t^2`` over minibatches of ``--chains`` pool chains at
   ``--steps`` random steps each; AdamW (learning rate ``--lr``), gradients clipped at 1.0.
4. Every ``--eval-every`` iterations, the held-out path-pooled relative drift error and cosine
   (:func:`~training.step.optimum.path_errors`), over all steps and over all but the last two (whose drift
   is tiny: a small absolute error there is a large share of the pooled figure).

The JSON's ``fit_ceiling`` maps ``objective -> set -> {"rank", "params", "path_error", "path_cosine",
"iterations", "curve"}``: the best budget tried (lowest path error) and the whole curve. That best is the
ceiling a trainer with that adapter is judged against (docs/design.md §5.8).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from configs.schema import LORA_TARGET_SETS
from training.reference.loader import reference_pipeline
from training.rewards import objective_reward
from training.sd_problem import DiffusionStepProblem
from training.step.optimum import drift_energies, exact_optimum, path_errors

POOL_SEED = 20_261_205
SETTINGS = ("pool", "held_out", "iterations", "chains", "steps", "lr")
SETS = (("attention", 4), ("attention", 16), ("attention_resnet", 4), ("broad", 8))
"""The (target set, rank) pairs measured: today's default at two ranks, and the sets that adapt more."""


@dataclass
class StatePool:
    """States ``x [S, N, ...]`` of ``N`` chains at each of ``S`` steps, their prompt indices ``[N]``, and the
    reference's and the optimum's mean there ``[S, N, ...]``."""

    x: torch.Tensor
    index: torch.Tensor
    reference: torch.Tensor
    target: torch.Tensor


@torch.no_grad()
def reference_pool(problem, chains: int, beta: float, seed: int, chunk: int) -> StatePool:
    """Every state of ``chains`` reference chains, and the reference's and the exact optimum's mean at
    each."""
    generator = torch.Generator().manual_seed(seed)
    xs, references, targets, indices = [], [], [], []
    for first in range(0, chains, chunk):
        index = torch.randint(0, len(problem.prompts), (min(chunk, chains - first),), generator=generator)
        x = torch.randn((len(index), *problem.latent_shape), generator=generator)
        cond = problem.make_cond(index)
        states, reference_means, means = [], [], []
        for step in range(len(problem.schedule)):
            states.append(x)
            means.append(problem.quadratic_optimum(x, step, cond, beta).mean)
            reference = problem.reference(x, step, cond)
            reference_means.append(reference.mean)
            x = reference.sample(generator)
        xs.append(torch.stack(states))
        references.append(torch.stack(reference_means))
        targets.append(torch.stack(means))
        indices.append(index)
    return StatePool(torch.cat(xs, 1), torch.cat(indices), torch.cat(references, 1), torch.cat(targets, 1))


@torch.no_grad()
def held_out_errors(problem: DiffusionStepProblem, pool: StatePool, beta: float, chunk: int) -> dict:
    """Path-pooled relative drift error and cosine of the adapter's mean on ``pool`` (all steps, and all but
    the last two)."""
    energies = []
    for step in range(len(problem.schedule)):
        reference = pool.reference[step].flatten(1)
        drift = []
        for first in range(0, pool.x.shape[1], chunk):
            part = slice(first, first + chunk)
            x, cond = pool.x[step, part], problem.make_cond(pool.index[part])
            drift.append(problem.policy(x, step, cond).mean.flatten(1) - reference[part])
        exact = exact_optimum(pool.target[step].flatten(1), torch.zeros(()), reference)
        energies.append(drift_energies(torch.cat(drift), exact, float(problem.schedule.sigma[step])))
    everything, early = path_errors(energies), path_errors(energies[:-2])
    return {
        "path_error": everything["path_relative_error"],
        "path_cosine": everything["path_cosine"],
        "path_error_without_last_two": early["path_relative_error"],
        "path_cosine_without_last_two": early["path_cosine"],
    }


def fit(problem, pool: StatePool, held_out: StatePool, args, beta: float, desc: str) -> list[dict]:
    """Regress the adapter's mean onto the optimum's (module docstring, step 3); the held-out curve."""
    parameters = [p for p in problem.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    generator = torch.Generator().manual_seed(POOL_SEED + 1)
    num_steps, num_chains = pool.x.shape[:2]
    sigma2 = problem.schedule.sigma.double() ** 2
    curve = []
    for iteration in tqdm(range(1, args.iterations + 1), desc=desc, disable=args.quiet):
        chains = torch.randint(0, num_chains, (args.chains,), generator=generator)
        steps = torch.randint(0, num_steps, (args.steps,), generator=generator)
        loss = 0.0
        for step in steps.tolist():
            x, cond = pool.x[step, chains], problem.make_cond(pool.index[chains])
            error = problem.policy(x, step, cond).mean - pool.target[step, chains]
            loss = loss + error.pow(2).flatten(1).sum(1).mean() / float(sigma2[step])
        optimizer.zero_grad()
        (loss / len(steps)).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if iteration % args.eval_every == 0 or iteration == args.iterations:
            curve.append({"iterations": iteration, **held_out_errors(problem, held_out, beta, args.chunk)})
    return curve


def fit_ceiling(config, home, args) -> dict:
    """The module docstring's measurement for every latent quadratic objective of ``config``."""
    started = time.perf_counter()
    report = {}
    for objective in config.objective_names:
        reward = objective_reward(objective, config, home)
        if reward.quadratic is None:
            continue
        beta = config.objective(objective).beta or config.train_for(objective).beta
        pools = None
        report[objective] = {}
        for target_set, rank in args.sets:
            pipe, _ = reference_pipeline(config, home, progress=False)
            torch.manual_seed(POOL_SEED)
            problem = DiffusionStepProblem.from_config(
                pipe, reward, config.for_objective(objective), lora_targets=target_set, lora_rank=rank
            )
            if problem.x0_estimate != "current_eps":
                raise SystemExit("error: --fit-ceiling needs train.x0_estimate current_eps (quadratic.yaml)")
            if pools is None:
                pools = [
                    reference_pool(problem, chains, beta, POOL_SEED + offset, args.chunk)
                    for offset, chains in ((10, args.pool), (20, args.held_out))
                ]
            params = sum(p.numel() for p in problem.unet.parameters() if p.requires_grad)
            curve = fit(problem, *pools, args, beta, f"{objective} {target_set} r{rank}")
            best = min(curve, key=lambda row: _or_inf(row["path_error"]))
            report[objective][f"{target_set}_r{rank}"] = {
                "target_set": target_set,
                "rank": rank,
                "modules": len(problem.lora_spec.modules),
                "params": params,
                **best,
                "curve": curve,
            }
    if not report:
        raise SystemExit("error: --fit-ceiling needs latent quadratic objectives (configs/quadratic.yaml)")
    return {
        "fit_ceiling": report,
        "sets": {name: list(targets) for name, targets in LORA_TARGET_SETS.items()},
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "measured": [f"{name}:{rank}" for name, rank in args.sets],
        "seconds": time.perf_counter() - started,
    }


def parse_sets(text: str) -> list[tuple[str, int]]:
    """``"attention:4,broad:8"`` -> ``[("attention", 4), ("broad", 8)]`` (``--sets``)."""
    pairs = []
    for item in text.split(","):
        name, _, rank = item.strip().partition(":")
        if name not in LORA_TARGET_SETS or not rank.isdigit() or int(rank) < 1:
            raise ValueError(
                f"--sets takes SET:RANK pairs with SET one of {', '.join(LORA_TARGET_SETS)}: {item!r}"
            )
        pairs.append((name, int(rank)))
    return pairs


def _or_inf(value: float) -> float:
    return math.inf if value is None or math.isnan(value) else value


def render_fit_ceiling(report: dict) -> str:
    """The docs table: one row per objective and set, the best budget's figures."""
    settings = report["settings"]
    lines = [
        f"Fit ceiling: noise-free regression onto the exact step optimum's mean ({settings['pool']} pool "
        f"chains, {settings['held_out']} held-out chains, {settings['chains']} chains x {settings['steps']} "
        f"steps per iteration, AdamW lr {settings['lr']:g}, up to {settings['iterations']} iterations; "
        f"{report['seconds'] / 60:.0f} min).",
        "",
        "| objective | target set | rank | parameters | best path error (iteration) | cosine | "
        "without the last two steps | at the last iteration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for objective, sets in report["fit_ceiling"].items():
        for row in sets.values():
            last = row["curve"][-1]
            lines.append(
                f"| {objective} | `{row['target_set']}` | {row['rank']} | {row['params'] / 1000:.1f}k | "
                f"{row['path_error']:.3f} ({row['iterations']}) | {row['path_cosine']:.3f} | "
                f"{row['path_error_without_last_two']:.3f} / {row['path_cosine_without_last_two']:.3f} | "
                f"{last['path_error']:.3f} / {last['path_cosine']:.3f} |"
            )
    return "\n".join(lines)
