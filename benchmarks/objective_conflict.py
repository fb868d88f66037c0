"""Do the default objectives conflict? Each base model vs the reference, scored on every default objective.

    python benchmarks/objective_conflict.py [--config PATH] [--samples N] [--json]

Trains (or reuses, from $MSDDA_HOME) one base model per default objective, samples N (default: the config's
``train.eval_samples``, 256) held-out images from
the reference and from each base model with the same seeds, and prints the mean reward and standard error on
every objective. The pair conflicts when each base model is worse than the reference on the other objective.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from configs import load_config
from training.analysis.sampling import sample_images
from training.base_model import default_prompts, evaluation_problem, train_base_model
from training.rewards import load_reward
from training.storage import msdda_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--samples", type=int, default=None, help="held-out samples per model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config, home = load_config(args.config), msdda_home()
    objectives = config.objective_names
    rewards = {name: load_reward(name, config, home, config.objective(name).options) for name in objectives}
    models = {"reference": None}
    for name in objectives:
        models[name] = train_base_model(config, name, home, progress=not args.json).path
    index = torch.arange(args.samples or config.train.eval_samples) % len(
        config.train.prompts or default_prompts()
    )
    table, samples = {}, {}
    for label, path in models.items():
        problem = evaluation_problem(config, home, path)
        generator = torch.Generator().manual_seed(config.train.eval_seed)
        images, prompts, _ = sample_images(problem, index, generator, use_policy=path is not None)
        table[label] = {}
        for name, reward in rewards.items():
            values = reward(images, prompts).detach()
            samples[label, name] = values
            table[label][name] = {
                "mean": float(values.mean()),
                "se": float(values.std() / math.sqrt(len(values))),
            }
            if path is not None:  # same prompts and seeds as the reference: paired difference
                diff = values - samples["reference", name]
                table[label][name]["delta_vs_reference"] = float(diff.mean())
                table[label][name]["delta_se"] = float(diff.std() / math.sqrt(len(diff)))
    conflict = all(
        table[trained][other]["mean"] < table["reference"][other]["mean"]
        for trained in objectives
        for other in objectives
        if other != trained
    )
    worse_in_se = {
        f"{trained} on {other}": -table[trained][other]["delta_vs_reference"]
        / table[trained][other]["delta_se"]
        for trained in objectives
        for other in objectives
        if other != trained
    }
    report = {
        "objectives": objectives,
        "samples": len(index),
        "rewards": table,
        "conflict": conflict,
        "worse_than_reference_in_paired_se": worse_in_se,
    }
    if args.json:
        print(json.dumps(report))
        return
    print("| model | " + " | ".join(objectives) + " |")
    print("|---|" + "---|" * len(objectives))
    for label, row in table.items():
        cells = [
            f"{row[n]['mean']:.4f} ± {row[n]['se']:.4f}"
            + (
                f" (Δ {row[n]['delta_vs_reference']:+.4f} ± {row[n]['delta_se']:.4f})"
                if "delta_se" in row[n]
                else ""
            )
            for n in objectives
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "\nmean ± SE over held-out samples; "
        "Δ: paired difference to the reference (same prompts and seeds) ± SE"
    )
    print(
        f"\nconflict (each model worse than the reference on the other objective): {conflict}; "
        + ", ".join(f"{k}: {v:.1f} paired SE worse" for k, v in worse_in_se.items())
        + f"; {len(index)} samples"
    )


if __name__ == "__main__":
    main()
