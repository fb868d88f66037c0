"""One prompt across the weight vectors: the README's picture, from the config's trained base models.

    python benchmarks/weight_row.py [--config PATH] [--prompt TEXT] [--weights "1,0;0.5,0.5;0,1"]
        [--method msdda] [--images N] [--rows R] [--seed S] [--models FOLDER ...] [--out PNG] [--json]

Trains (or reuses, from $MSDDA_HOME) one base model per objective of the config, or takes ``--models``,
loads them into :class:`composition.pipeline.MSDDAPipeline` (the library's front door), and samples
``--images`` images of one prompt for each weight vector with the same seed, so every column starts from the
same noise. The default weight vectors are the reference (all zero) and five points from the first base model
to the second. The picture shows the first ``--rows`` images of each column, headed by its weights and the
mean of each base model's reward over all ``--images``; ``--json`` prints those means with their standard
errors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from composition.evaluation import weight_row
from composition.pipeline import MSDDAPipeline
from configs import load_config
from training.base_model import train_base_model
from training.rewards import load_reward, mean_and_se
from training.sd_problem import decode_latents
from training.storage import msdda_home

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "weight-row.png"


def default_weights(num_models: int) -> list[list[float]]:
    """The reference (all zero), then five points from the first objective to the second (K = 2)."""
    if num_models != 2:
        raise SystemExit(f"error: pass --weights for {num_models} objectives (the default walks two)")
    return [[0.0, 0.0]] + [[1.0 - a, a] for a in (0.0, 0.25, 0.5, 0.75, 1.0)]


def parse_weight_list(text: str) -> list[list[float]]:
    return [[float(w) for w in point.split(",")] for point in text.split(";") if point.strip()]


@torch.no_grad()
def sample_point(pipe, rewards: dict, prompts: list[str], weights: list[float], args, options):
    """``(weights, images, rewards)`` for one weight vector: the images and every reward on each of them."""
    latents = pipe(
        prompts, weights, args.method, seed=args.seed, output_type="latent", options=options
    ).images
    images = decode_latents(pipe.vae, latents)
    scores = {
        name: reward.score(latents, prompts, lambda _: images).cpu() for name, reward in rewards.items()
    }
    return weights, images.cpu(), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--prompt", default="a handwritten digit seven")
    parser.add_argument("--weights", default=None, help='weight vectors, e.g. "1,0;0.5,0.5;0,1"')
    parser.add_argument("--method", default="msdda")
    parser.add_argument("--images", type=int, default=64, help="images per weight vector (for the means)")
    parser.add_argument("--rows", type=int, default=3, help="images per weight vector in the picture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models", nargs="+", type=Path, default=None, help="base-model folders instead of the config's"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config, home = load_config(args.config), msdda_home()

    # 1. The base models (trained once, then cached) and the pipeline holding them.
    folders = args.models or [
        train_base_model(config, name, home, progress=not args.json).path for name in config.objective_names
    ]
    points = parse_weight_list(args.weights) if args.weights else default_weights(len(folders))
    pipe = MSDDAPipeline.from_embedded(config, home)
    for folder in folders:
        pipe.load_base_model(folder)
    pipe.set_progress_bar_config(disable=True)
    rewards = {  # each base model's own reward, as its card names it
        model.card.reward.name: load_reward(model.card.reward.name, config, home, model.card.reward.options)
        for model in pipe.base_models.values()
    }

    # 2. The same prompt and seed for every weight vector; every reward on every image.
    options = config.composition.model_copy(update={"batch_size": max(args.images, 1)})
    prompts = [args.prompt] * args.images
    sampled, table = [], []
    for weights in points:
        sampled.append(sample_point(pipe, rewards, prompts, weights, args, options))
        table.append({"weights": weights, **{name: mean_and_se(v) for name, v in sampled[-1][2].items()}})

    # 3. The picture, written through a temporary file.
    title = f'{args.method}: "{args.prompt}" (reward means over {args.images} images)'
    path = weight_row(sampled, args.out, rows=args.rows, title=title)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "method": args.method, "points": table, "path": str(path)}))
        return
    for row in table:
        means = "  ".join(f"{name} {m:+.3f} ± {se:.3f}" for name, (m, se) in row.items() if name != "weights")
        print(f"w = {', '.join(f'{w:g}' for w in row['weights']):<12} {means}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
