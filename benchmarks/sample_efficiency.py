"""Reward versus UNet evaluations: the step-level trainer against trl 0.23.1's DDPO, same reward, prompts,
seeds.

    python benchmarks/sample_efficiency.py [--objective ink_economy] [--json] [--write-readme]

Both start from the embedded reference with trl's adapter, a rank-4 LoRA on the attention projections
(:data:`DDPO_ADAPTER`; the config's own adapter is set aside). For the step-level trainer the reward is the
mean of --eval-samples held-out full-chain samples every --eval-every iterations (evaluation rows are not
counted as training cost); for DDPO it is the mean reward of each epoch's on-policy samples, which are its
training data. Reports the UNet rows each method needed and the ratio at which the step-level trainer first
reaches DDPO's final reward (the mean of its last three epochs).

DDPO maximises the reward with no KL term, so reaching its reward mixes two objectives. DDPO's adapter is
therefore also saved every --ddpo-snapshot-every epochs and evaluated like the step-level policy (same
held-out noise and prompts): held-out reward, path KL from the reference and ``J = reward - beta * KL`` at the
step-level beta, and DDPO's reward at the step-level trainer's KL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

from configs import load_config
from training.analysis.ddpo_baseline import run_ddpo
from training.analysis.sampling import sample_images
from training.base_model import default_prompts
from training.reference.loader import reference_pipeline
from training.rewards import load_reward
from training.sd_problem import DiffusionStepProblem
from training.storage import msdda_home
from training.trainer import train

DDPO_ADAPTER = {"lora_rank": 4, "lora_targets": "attention"}
"""trl's ``DefaultDDPOStableDiffusionPipeline`` adapter (rank 4 on the attention projections), which the
step-level trainer uses here too, whatever the config's adapter: the trainers are compared on one adapter."""


def evaluate_policy(problem, reward, index: torch.Tensor) -> dict:
    """Held-out reward (mean, SE) and path KL from the reference (nats, summed over the steps) of the
    problem's current policy; fixed noise, and its UNet rows are not counted as training cost."""
    rows = problem.unet_evaluations
    noise = torch.Generator().manual_seed(777)
    images, prompts, step_kl = sample_images(problem, index, noise, use_policy=True)
    problem.unet_evaluations = rows
    rewards = reward(images, prompts).double()
    return {
        "reward": float(rewards.mean()),
        "reward_se": float(rewards.std() / len(rewards) ** 0.5),
        "kl": step_kl * len(problem.schedule),
    }


def step_level_curve(config, home, objective, iterations, eval_every, eval_samples, progress, beta=None):
    spec = config.objective(objective)
    reward = load_reward(objective, config, home, spec.options)
    pipe, _ = reference_pipeline(config, home, progress)
    prompts = config.train.prompts or default_prompts()
    problem = DiffusionStepProblem.from_config(pipe, reward, config, seed=0)
    index = torch.arange(eval_samples) % len(prompts)
    curve = {"unet_evaluations": [], "reward_mean": [], "reward_se": [], "kl": [], "seconds": []}

    def evaluate(metrics=None):
        if metrics is not None and metrics.iteration % eval_every:
            return
        point = evaluate_policy(problem, reward, index)
        curve["unet_evaluations"].append(problem.unet_evaluations)
        curve["reward_mean"].append(point["reward"])
        curve["reward_se"].append(point["reward_se"])
        curve["kl"].append(point["kl"])
        curve["seconds"].append(metrics.seconds if metrics else 0.0)

    evaluate()
    cfg = config.train.model_copy(
        update={
            "iterations": iterations,
            "beta": beta or spec.beta or config.train.beta,
            "checkpoint_every": 0,
        }
    )
    train(problem, cfg, log_metrics=evaluate, progress=progress)
    return curve, reward, prompts, problem


def ddpo_points(problem, reward, snapshots: list[dict], index: torch.Tensor) -> list[dict]:
    """Each DDPO snapshot's adapter evaluated in ``problem`` exactly as the step-level policy is (same
    held-out noise and prompts; reference variance, as DDPO's DDIM sampler has); the problem's own trained
    state is restored afterwards."""
    own = {k: v.clone() for k, v in problem.trainable_state().items()}
    points = []
    try:
        for snap in snapshots:
            state = {f"lora.{k}": v for k, v in snap["adapter"].items()}
            if "log_variance" in own:
                state["log_variance"] = torch.zeros_like(own["log_variance"])
            problem.load_trainable_state(state)
            points.append(
                {"epoch": snap["epoch"], "unet_evaluations": snap["unet_evaluations"]}
                | evaluate_policy(problem, reward, index)
            )
    finally:
        problem.load_trainable_state(own)
    return points


def reward_at_kl(points: list[dict], kl: float) -> float | None:
    """DDPO's held-out reward at path KL ``kl``, linear between the two snapshots that bracket it (in
    training order); ``None`` when its snapshots never reach ``kl``."""
    for before, after in itertools.pairwise(points):
        low, high = sorted((before["kl"], after["kl"]))
        if low <= kl <= high and high > low:
            share = (kl - before["kl"]) / (after["kl"] - before["kl"])
            return before["reward"] + share * (after["reward"] - before["reward"])
    return None


def first_reaching(curve: dict, target: float) -> int | None:
    for rows, value in zip(curve["unet_evaluations"], curve["reward_mean"]):
        if value >= target:
            return rows
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--config", default=None)
    parser.add_argument("--objective", default="ink_economy")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--ddpo-epochs", type=int, default=60)
    parser.add_argument(
        "--ddpo-snapshot-every",
        type=int,
        default=10,
        help="epochs between the DDPO adapters evaluated for held-out reward and path KL (and its last)",
    )
    parser.add_argument("--beta", type=float, default=None, help="KL coefficient of the step-level trainer")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--write-readme", action="store_true", help="write the tables into the docs (docs/results.md)"
    )
    args = parser.parse_args()
    config, home = load_config(args.config), msdda_home()
    config = config.model_copy(update={"train": config.train.model_copy(update=DDPO_ADAPTER)})
    ours, reward, prompts, problem = step_level_curve(
        config,
        home,
        args.objective,
        args.iterations,
        args.eval_every,
        args.eval_samples,
        progress=not args.json,
        beta=args.beta,
    )
    beta = args.beta or config.objective(args.objective).beta or config.train.beta
    reference_path = reference_pipeline(config, home, False)[0].name_or_path
    with tempfile.TemporaryDirectory() as out:
        ddpo = run_ddpo(
            config,
            Path(reference_path),
            reward,
            prompts,
            args.ddpo_epochs,
            Path(out),
            snapshot_every=args.ddpo_snapshot_every,
        )
    index = torch.arange(args.eval_samples) % len(prompts)
    snapshots = ddpo_points(problem, reward, ddpo.snapshots, index)
    for point in snapshots:
        point["J"] = point["reward"] - beta * point["kl"]
    ddpo_final = sum(ddpo.reward_mean[-3:]) / len(ddpo.reward_mean[-3:])
    ddpo_rows = ddpo.unet_evaluations[-1]
    reached = first_reaching(ours, ddpo_final)
    ours_final = ours["reward_mean"][-1]
    ddpo_reached_ours = first_reaching(ddpo.__dict__, ours_final)
    ours_reached_own = first_reaching(ours, ours_final)
    curve = {k: v for k, v in ddpo.__dict__.items() if k != "snapshots"}
    report = {
        "objective": args.objective,
        "beta": beta,
        "reward_reference": ours["reward_mean"][0],
        "ddpo": {
            "final_reward": ddpo_final,
            "unet_evaluations": ddpo_rows,
            "curve": curve,
            "snapshots": snapshots,
            "reward_at_step_level_kl": reward_at_kl(snapshots, ours["kl"][-1]),
        },
        "step_level": {
            "final_reward": ours_final,
            "final_reward_se": ours["reward_se"][-1],
            "kl": ours["kl"][-1],
            "J": ours_final - beta * ours["kl"][-1],
            "unet_evaluations": ours["unet_evaluations"][-1],
            "rows_to_reach_ddpo_final": reached,
            "curve": ours,
        },
        "ratio_rows_to_reach_ddpo_final": (reached / ddpo_rows) if reached is not None else None,
        "ddpo_rows_to_reach_step_level_final": ddpo_reached_ours,
        "ratio_rows_to_reach_step_level_final": (ours_reached_own / ddpo_reached_ours)
        if ddpo_reached_ours and ours_reached_own
        else None,
    }
    table = render_table(report)
    if args.write_readme:
        write_section("sample-efficiency", table)
    print(json.dumps(report) if args.json else table)


def render_table(report: dict) -> str:
    ratio = report["ratio_rows_to_reach_ddpo_final"]
    ours, ddpo = report["step_level"], report["ddpo"]
    other = report["ratio_rows_to_reach_step_level_final"]
    beta = report["beta"]
    lines = [
        (
            f"Objective `{report['objective']}`, step-level beta {beta}; reference reward "
            f"{report['reward_reference']:.4f}."
        ),
        "",
        "| trainer | final reward | UNet rows used | UNet rows to reach DDPO's final reward |",
        "|---|---|---|---|",
        (
            f"| DDPO (trl 0.23.1) | {ddpo['final_reward']:.4f} | {ddpo['unet_evaluations']:,} | "
            f"{ddpo['unet_evaluations']:,} |"
        ),
        f"| step-level (ours) | {ours['final_reward']:.4f} | {ours['unet_evaluations']:,} | "
        + (
            f"{ours['rows_to_reach_ddpo_final']:,} (ratio {ratio:.2f})"
            if ratio is not None
            else "not reached"
        )
        + " |",
        "",
        "Rows DDPO needs to reach the step-level trainer's final reward: "
        + (
            f"{report['ddpo_rows_to_reach_step_level_final']:,} (step-level/DDPO ratio {other:.2f})."
            if other is not None
            else "not reached."
        ),
    ]
    if ddpo.get("snapshots"):
        lines += [
            "",
            f"Held-out reward against path KL from the reference (nats, summed over the steps) and "
            f"`J = reward - {beta} * KL`, both trainers' policies sampled with the same noise and prompts:",
            "",
            "| policy | UNet rows | held-out reward | path KL | J |",
            "|---|---|---|---|---|",
            f"| step-level (ours), final | {ours['unet_evaluations']:,} | {ours['final_reward']:.4f} "
            f"± {ours['final_reward_se']:.4f} | {ours['kl']:.3f} | {ours['J']:.4f} |",
        ]
        lines += [
            f"| DDPO, epoch {p['epoch']} | {p['unet_evaluations']:,} | {p['reward']:.4f} ± "
            f"{p['reward_se']:.4f} | {p['kl']:.3f} | {p['J']:.4f} |"
            for p in ddpo["snapshots"]
        ]
        matched = ddpo["reward_at_step_level_kl"]
        lines += [
            "",
            "At the step-level trainer's KL, DDPO's held-out reward (linear between its snapshots): "
            + (
                f"{matched:.4f}, against the step-level trainer's {ours['final_reward']:.4f}."
                if matched is not None
                else "its snapshots do not reach that KL."
            ),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
