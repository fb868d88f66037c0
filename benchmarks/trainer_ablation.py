"""The trainer against the fit ceiling: each trainer change alone and together, by the exact kernel check.

    python benchmarks/trainer_ablation.py [--config configs/quadratic.yaml]
        [--variants likelihood,regression,reference_pool,...] [--parallel 2] [--json] [--write-docs]

1. For each variant (``VARIANTS``: overrides of the config's ``train`` section) and each of the config's
   objectives, trains (or reuses) the base model in ``MSDDA_HOME``, ``--parallel`` trainings at once, one
   torch thread each (as ``msdda run --runner dask`` trains).
2. Scores each variant's base models with ``benchmarks/step_optimality.py --exact --no-oracle --json`` (the
   config's objectives must be latent quadratics): path-pooled drift error and cosine against the closed-form
   step optimum, also without the last two steps, and the variance ratio (docs/design.md §5.7); and the path
   error at the reference's chains alone, the states the fit ceiling is scored on.
3. Sets them beside the fit ceiling (``benchmarks/results/fit_ceiling.json``, docs/design.md §5.8) of the same
   target set and rank at the trainer's iteration budget: the noise-free regression's error after as many
   iterations of the same batch (32 chains x 4 steps).

``--write-docs`` writes the table into docs/design.md (§5.9) and the JSON into
``benchmarks/results/trainer_ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "design.md"
RESULTS = REPO / "benchmarks" / "results"
CEILING = RESULTS / "fit_ceiling.json"
VARIANTS = {
    "likelihood": [],
    "regression": ["train.target_loss=regression"],
    "cosine": ["train.learning_rate_schedule=cosine"],
    "regression+cosine": ["train.target_loss=regression", "train.learning_rate_schedule=cosine"],
    "reference_pool": ["train.states=reference_pool"],
    "reference_pool+regression": ["train.states=reference_pool", "train.target_loss=regression"],
    "mixed": ["train.states=mixed"],
    "mixed+regression": ["train.states=mixed", "train.target_loss=regression"],
}


def variant_file(config_path: str | None, overrides: list[str], folder: Path, name: str) -> Path:
    """The config with ``overrides`` applied, as a YAML file (what step_optimality reads)."""
    from configs import load_config

    config = load_config(config_path, overrides)
    path = folder / f"{name.replace('+', '_')}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    return path


def train_one(config_file: str, objective: str, home: str) -> dict:
    """One base model in this (spawned) process, one torch thread."""
    from configs import load_config
    from training.base_model import train_base_model
    from training.device import configure_threads

    configure_threads(1)
    start = time.perf_counter()
    result = train_base_model(load_config(config_file), objective, Path(home), progress=False)
    return {"seconds": time.perf_counter() - start, "cached": result.cached, "path": str(result.path)}


def exact_check(config_file: Path) -> dict:
    """``step_optimality.py --exact --no-oracle --json`` on the variant's (already trained) base models."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_optimality.py"), "--config", str(config_file)]
        + ["--exact", "--no-oracle", "--json", "--quiet"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"error: the exact check of {config_file.name} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["base_models"]


def ceiling_at(objective: str, target_set: str, rank: int, iterations: int) -> dict | None:
    """The fit ceiling's held-out figures at the last budget it measured that is not above ``iterations``."""
    if not CEILING.exists():
        return None
    row = json.loads(CEILING.read_text())["fit_ceiling"].get(objective, {}).get(f"{target_set}_r{rank}")
    if row is None:
        return None
    within = [point for point in row["curve"] if point["iterations"] <= iterations]
    return within[-1] if within else None


def measure(args) -> dict:
    from configs import load_config
    from training.storage import msdda_home

    home = msdda_home()
    base = load_config(args.config)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(
            f"error: unknown variant(s) {', '.join(unknown)}: the variants are {', '.join(VARIANTS)}"
        )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = {v: variant_file(args.config, VARIANTS[v], Path(folder), v) for v in variants}
        jobs = [(v, objective) for v in variants for objective in base.objective_names]
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.parallel, mp_context=spawn) as pool:
            runs = pool.map(train_one, *zip(*[(str(files[v]), o, str(home)) for v, o in jobs]))
            trained = dict(zip(jobs, runs))
        for (variant, objective), run in trained.items():
            print(f"{variant} {objective}: {run['seconds']:.0f} s (cached: {run['cached']})", file=sys.stderr)
        for variant in variants:
            errors = exact_check(files[variant])
            config = load_config(files[variant])
            for objective in base.objective_names:
                err = errors[objective]
                train = config.for_objective(objective).train
                target_set = train.lora_targets if isinstance(train.lora_targets, str) else "custom"
                ceiling = ceiling_at(objective, target_set, train.lora_rank, train.iterations)
                rows.append(
                    {
                        "variant": variant,
                        "overrides": VARIANTS[variant],
                        "objective": objective,
                        "path_error": err["path_relative_error"],
                        "path_cosine": err["path_cosine"],
                        "path_error_without_last_two": err["path_error_without_last_two"],
                        "path_cosine_without_last_two": err["path_cosine_without_last_two"],
                        "variance_ratio": err["variance_ratio"],
                        "on_reference_chains": err["on_reference_chains"]["path_relative_error"],
                        "ceiling": ceiling,
                        "target_set": target_set,
                        "rank": train.lora_rank,
                        "iterations": train.iterations,
                        "train_seconds": trained[variant, objective]["seconds"],
                    }
                )
    return {"config": args.config, "date": time.strftime("%Y-%m-%d"), "parallel": args.parallel, "rows": rows}


def render(report: dict) -> str:
    """Markdown: one row per variant and objective, with the ceiling at the same budget."""
    lines = [
        "| objective | trainer variant | path error | cosine | without the last two steps | variance ratio "
        "| at the reference's chains | fit ceiling at the same budget (without the last two) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(report["rows"], key=lambda r: r["objective"]):
        ceiling = row["ceiling"]
        limit = (
            f"{ceiling['path_error']:.3f} ({ceiling['path_error_without_last_two']:.3f}), "
            f"{ceiling['iterations']} it"
            if ceiling
            else "not measured"
        )
        lines.append(
            f"| {row['objective']} | {row['variant']} | {row['path_error']:.3f} | {row['path_cosine']:.3f} | "
            f"{row['path_error_without_last_two']:.3f} / {row['path_cosine_without_last_two']:.3f} | "
            f"{row['variance_ratio']:.2f} | {_figure(row.get('on_reference_chains'))} | {limit} |"
        )
    first = report["rows"][0]
    variants = list(dict.fromkeys(row["variant"] for row in report["rows"]))
    chosen = "" if variants == list(VARIANTS) else f" --variants {','.join(variants)}"
    lines.append(
        f"\n`{first['target_set']}` LoRA at rank {first['rank']}, {first['iterations']} iterations, "
        f"exact check (`step_optimality.py --exact`), {report['date']}: "
        f"`python benchmarks/trainer_ablation.py --config {report['config']}{chosen} --write-docs`."
    )
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quadratic.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--parallel", type=int, default=2, help="trainings at once, one torch thread each")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/design.md")
    parser.add_argument("--from-json", default=None, help="re-render a report saved by --json")
    args = parser.parse_args()
    report = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    if args.write_docs:
        from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

        from training.storage import atomic_file

        with atomic_file(RESULTS / "trainer_ablation.json") as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        write_section("trainer-ablation", render(report), target=DOCS)
    print(json.dumps(report, indent=1) if args.json else render(report))


if __name__ == "__main__":
    main()
