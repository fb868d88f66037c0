"""Does the step-level trainer reach the analytic optimum pi*? (2-D Gaussian mixture, exact reference
epsilon.)

    python benchmarks/toy_step_rl.py --json

prints {"mean_error_over_sigma": ..., "variance_rel_error": ...} (plus per-step detail and settings): the mean
over DDIM steps of ||mu_theta - mu*|| / sigma_t and of |var_theta / var* - 1| on 2,000 held-out states.
Goal: <= 0.1 and <= 0.1.
"""

from __future__ import annotations

import argparse
import json
import time

from configs import TrainConfig
from training.analysis.toy import ToyProblem, evaluate_against_optimum
from training.trainer import train


def run(iterations: int, method: str, seed: int, progress: bool) -> dict:
    config = TrainConfig(
        method=method,
        beta=1.0,
        iterations=iterations,
        batch_size=256,
        states_per_trajectory=10,
        num_actions=64,
        learning_rate=3e-3,
        seed=seed,
    )
    problem = ToyProblem(num_inference_steps=10)
    start = time.perf_counter()
    train(problem, config, progress=progress)
    report = evaluate_against_optimum(problem, config.beta)
    report.update(method=method, iterations=iterations, seconds=round(time.perf_counter() - start, 2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--method", choices=["target_matching", "policy_gradient"], default="target_matching")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.iterations, args.method, args.seed, progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["per_step"]:
            print(
                f"step {row['step']:2d}  |dmu|/sigma {row['mean_error_over_sigma']:.4f}  "
                f"|dvar|/var {row['variance_rel_error']:.4f}"
            )
        print(
            f"mean: {report['mean_error_over_sigma']:.4f} / {report['variance_rel_error']:.4f} "
            f"in {report['seconds']} s"
        )


if __name__ == "__main__":
    main()
