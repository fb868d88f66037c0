"""MSDDA against the baselines and the oracle on the embedded default (issue: composition results).

    python benchmarks/composition_results.py [--num-images 256] [--oracle-images 1024]
        [--curve-images 128] [--no-curves] [--json] [--write-readme]

1. Trains (or reuses) the base models for the config's two objectives and, as the oracle, a model trained
   directly on ``w_1 R_1 + w_2 R_2`` for w_1 in {0.25, 0.5, 0.75} (same trainer, beta and budget).
2. Sweeps every method over the 11-point weight grid (same prompts and seeds), hypervolume against the
   reference model's rewards with its bootstrap SE, and compares methods at matched NFE. Every point also
   carries its mean path KL from the reference and ``J_w = E[sum w_i r_i] - beta KL`` (docs/design.md §4.5).
   Curves, not points: MSDDA, the blend and the soup again at target betas beta/2 and beta/4, CoDe at N = 4,
   RGG at scales 0.25 and 0.5 (``--curve-images`` each), so fronts can be read at matched KL and cost.
3. MSDDA against the oracle at the three weights: the difference of mean rewards in units of the paired
   standard error (both samplers start from the same x_T and draw the same noise stream).
4. The learned variances, and where MSDDA and the epsilon blend part ways (same weights, paired).
Writes ``benchmarks/results/composition.json``, ``pareto.png``, ``reward_kl.png`` and ``variances.png``
there and, with --write-readme, the docs/results.md block between the ``composition-results`` markers
(``--from-json`` re-renders them from the saved JSON without sampling).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

from composition.engine import generate, load_ensemble, score_generated
from composition.methods import METHODS
from configs import load_config
from configs.schema import ObjectiveSpec
from flows.jobs import sweep_job
from training.base_model import train_base_model
from training.storage import msdda_home

RESULTS = Path(__file__).resolve().parent / "results"
ORACLE_WEIGHTS = (0.25, 0.5, 0.75)
J_WEIGHTS = (0.2, 0.5, 0.8)
"""Weights ``w_1`` on the 11-point grid where the J table and the reward-against-KL figure are shown."""


def oracle_config(config, weights: list[float]):
    """The config with a ``weighted_sum`` objective for ``weights`` over the config's objectives."""
    terms = dict(zip(config.objective_names, weights))
    spec = ObjectiveSpec(name="weighted_sum", options={"terms": terms})
    return config.model_copy(update={"objectives": [*config.objectives, spec]})


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` and its standard error (per-image pairs share x_T and noise)."""
    d = a - b
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def oracle_comparison(config, home, base_dirs, oracle_dirs, num_images) -> list[dict]:
    ensemble = load_ensemble(config, home, base_dirs)
    rows = []
    for w1, oracle_dir in zip(ORACLE_WEIGHTS, oracle_dirs):
        weights = [w1, 1 - w1]
        msdda = generate(ensemble, "msdda", weights, config.composition, num_images=num_images)
        msdda_scores = score_generated(ensemble, msdda)
        oracle_ensemble = load_ensemble(oracle_config(config, weights), home, [oracle_dir])
        oracle = generate(oracle_ensemble, "msdda", [1.0], config.composition, num_images=num_images)
        oracle_scores = score_generated(ensemble, oracle)
        first, second = ensemble.objectives
        combined = {
            "msdda": w1 * msdda_scores[first] + (1 - w1) * msdda_scores[second],
            "oracle": w1 * oracle_scores[first] + (1 - w1) * oracle_scores[second],
        }
        row = {"weights": weights, "nfe": {"msdda": msdda.nfe_per_image, "oracle": oracle.nfe_per_image}}
        for name in ensemble.objectives:
            diff, se = paired(msdda_scores[name], oracle_scores[name])
            row[name] = {
                "msdda": float(msdda_scores[name].mean()),
                "oracle": float(oracle_scores[name].mean()),
                "difference": diff,
                "paired_se": se,
                "difference_in_se": diff / se if se else 0.0,
            }
        diff, se = paired(combined["msdda"], combined["oracle"])
        row["combined_diff"], row["se"] = diff, se
        row["combined"] = {
            "msdda": float(combined["msdda"].mean()),
            "oracle": float(combined["oracle"].mean()),
            "difference": diff,
            "paired_se": se,
            "difference_in_se": diff / se if se else 0.0,
        }
        rows.append(row)
    return rows


def variance_report(config, home, base_dirs, num_images) -> dict:
    """The learned ``exp(v[t])`` per step, and MSDDA minus the epsilon blend at w = (0.5, 0.5) (paired)."""
    ensemble = load_ensemble(config, home, base_dirs)
    offsets = {
        m.objective: (m.log_variance.exp().flatten().tolist() if m.log_variance is not None else None)
        for m in ensemble.models
    }
    weights = [0.5, 0.5]
    a = generate(ensemble, "msdda", weights, config.composition, num_images=num_images)
    b = generate(ensemble, "db", weights, config.composition, num_images=num_images)
    sa, sb = score_generated(ensemble, a), score_generated(ensemble, b)
    gaps = {}
    for name in ensemble.objectives:
        diff, se = paired(sa[name], sb[name])
        gaps[name] = {"difference": diff, "paired_se": se}
    return {
        "variance_ratio_per_step": offsets,
        "composed_std_over_sigma": [d["std_over_sigma"] for d in a.diagnostics],
        "msdda_minus_db_at_0.5": gaps,
        "image_l2_distance": float((a.images - b.images).flatten(1).norm(dim=1).mean()),
    }


def matched_nfe(sweep: dict) -> list[dict]:
    """Each baseline's hypervolume next to MSDDA's, with their NFE per image (max over the grid)."""
    ours = sweep["methods"]["msdda"]
    return [
        {
            "method": m,
            "hypervolume": v["hypervolume"],
            "nfe": v["max_nfe"],
            "msdda_hypervolume": ours["hypervolume"],
            "msdda_nfe": ours["max_nfe"],
            "msdda_at_least": ours["hypervolume"] >= v["hypervolume"],
        }
        for m, v in sweep["methods"].items()
        if m != "msdda"
    ]


def base_beta(config) -> float:
    """The objectives' common KL coefficient (the one the base models were trained with)."""
    betas = {config.objective(name).beta or config.train.beta for name in config.objective_names}
    if len(betas) != 1:
        raise SystemExit(f"the objectives' betas differ ({sorted(betas)}): this benchmark needs one beta")
    return betas.pop()


def curve_variants(beta: float) -> list[tuple[str, str, dict]]:
    """``(label, method, composition settings)`` of the extra points on each method's curve."""
    variants = [
        (f"{m}@beta={beta * f:g}", m, {"beta": beta * f}) for f in (0.5, 0.25) for m in ("msdda", "db", "rs")
    ]
    variants.append(("code@N=4", "code", {"code_candidates": 4}))
    variants += [(f"rgg@{scale:g}", "rgg", {"rgg_scale": scale}) for scale in (0.25, 0.5)]
    return variants


def with_composition(config, **settings):
    return config.model_copy(update={"composition": config.composition.model_copy(update=settings)})


def summarise(result: dict, beta: float) -> tuple[dict, dict]:
    """``(hypervolume, objective_J)`` entries per method of a sweep: J at the base models' ``beta`` (so
    every curve point is compared on the same objective), NFE and reward calls per image (max over the
    grid), mean path KL and seconds per image."""
    hv, objective = {}, {}
    num_images = result["settings"]["num_images"]
    for method, v in result["methods"].items():
        points = v["points"]
        kls = [p["kl"] for p in points if "kl" in p]
        hv[method] = {
            "value": v["hypervolume"],
            "se": v["hypervolume_se"],
            "nfe": v["max_nfe"],
            "reward_calls": max(p["reward_calls"] for p in points),
            "kl": sum(kls) / len(kls) if kls else None,
            "seconds_per_image": sum(p["seconds"] for p in points) / (len(points) * num_images),
        }
        objective[method] = [
            {
                "weights": p["weights"],
                "J": p["combined"] - beta * p["kl"],
                "kl": p["kl"],
                "combined": p["combined"],
                "J_se": p["J_se"] if result["settings"].get("beta") == beta else None,
            }
            for p in points
            if "combined" in p
        ]
    return hv, objective


def render_costs_and_J(report: dict) -> list[str]:
    """Every method and curve point: hypervolume ± bootstrap SE, cost (NFE, reward calls, seconds per image),
    mean path KL, and ``J_w`` at the base beta for the three oracle weights."""
    if "hypervolume" not in report:
        return []
    beta = report["beta"]
    curve_images = next((c["num_images"] for c in report["curves"].values()), "-")
    lines = [
        "",
        (
            "Hypervolume with its bootstrap SE over images, the cost per image, the mean path KL "
            f"over the grid and `J_w = E[sum w_i r_i] - beta KL` at beta = {beta:g} (higher is better; "
            "CoDe's KL is its `log N`-per-block bound). `name@beta=b`: the target beta b; "
            "`code@N=n`: n candidates; `rgg@s`: guidance scale s. Curve points use "
            f"{curve_images} images."
        ),
        "",
        "| method | hypervolume (SE) | NFE | reward calls | s/image | KL | "
        + " | ".join(f"J at w1={w:g}" for w in J_WEIGHTS)
        + " | weights where MSDDA's J >= this |",
        "|---|---|---|---|---|---|" + "---|" * len(J_WEIGHTS) + "---|",
    ]
    ours = {round(r["weights"][0], 6): r["J"] for r in report["objective_J"].get("msdda", [])}
    for label, h in report["hypervolume"].items():
        rows = {round(r["weights"][0], 6): r for r in report["objective_J"].get(label, [])}
        shared = [w for w in rows if w in ours]
        wins = sum(ours[w] >= rows[w]["J"] for w in shared)
        js = []
        for w in J_WEIGHTS:
            row = rows.get(round(w, 6))
            js.append("-" if row is None else f"{row['J']:+.4f}")
        kl = "-" if h["kl"] is None else f"{h['kl']:.3f}"
        lines.append(
            f"| {label} | {h['value']:.5f} ({h['se']:.5f}) | {h['nfe']:g} | {h['reward_calls']:g} | "
            f"{h['seconds_per_image']:.3f} | {kl} | "
            + " | ".join(js)
            + (" | |" if label == "msdda" else f" | {wins} of {len(shared)} |")
        )
    return lines


def render(report: dict) -> str:
    s = report["sweep"]
    names = s["objectives"]
    reference = ", ".join(f"{s['reference']['rewards'][n]:.4f}" for n in names)
    lines = [
        (
            f"Embedded default, objectives `{names[0]}` and `{names[1]}`; "
            f"{s['settings']['num_images']} images per point, 11 weights, seed {s['settings']['seed']}; "
            f"hypervolume against the reference model ({reference}). CoDe: N = "
            f"{s['settings']['code_candidates']}, B = {s['settings']['code_block']}; RGG scale "
            f"{s['settings']['rgg_scale']}. NFE = UNet rows per image (a backward pass counts 2)."
        ),
        "",
        "| method | hypervolume | max NFE/image | MSDDA HV >= this? |",
        "|---|---|---|---|",
        f"| MSDDA | {s['methods']['msdda']['hypervolume']:.5f} | {s['methods']['msdda']['max_nfe']:g} | |",
    ]
    for row in report["matched_nfe"]:
        lines.append(
            f"| {row['method']} | {row['hypervolume']:.5f} | {row['nfe']:g} | "
            f"{'yes' if row['msdda_at_least'] else '**no**'} |"
        )
    lines += render_costs_and_J(report)
    lines += [
        "",
        (
            "MSDDA against the oracle (a base model trained on the combined reward), "
            f"{report['oracle_images']} images, paired over x_T and noise:"
        ),
        "",
        (
            f"| w | {names[0]}: MSDDA - oracle (SE) | {names[1]}: MSDDA - oracle (SE) | "
            "combined: MSDDA - oracle (SE) | within 2 SE? |"
        ),
        "|---|---|---|---|---|",
    ]
    for row in report["oracle"]:
        cells = [
            f"{row[k]['difference']:+.4f} ({row[k]['paired_se']:.4f}, {row[k]['difference_in_se']:+.1f} SE)"
            for k in (*names, "combined")
        ]
        within = abs(row["combined"]["difference_in_se"]) <= 2
        lines.append(
            f"| {row['weights'][0]:g}, {row['weights'][1]:g} | "
            + " | ".join(cells)
            + f" | {'yes' if within else '**no**'} |"
        )
    v = report["variance"]
    ratios = {
        k: (f"{min(r):.3f}..{max(r):.3f}" if r else "none") for k, r in v["variance_ratio_per_step"].items()
    }
    gap = v["msdda_minus_db_at_0.5"]
    lines += [
        "",
        "Learned variances (exp(v[t]) over the steps): "
        + "; ".join(f"`{k}` {r}" for k, r in ratios.items())
        + ". At w = (0.5, 0.5) MSDDA minus the epsilon blend: "
        + "; ".join(f"`{k}` {g['difference']:+.4f} (paired SE {g['paired_se']:.4f})" for k, g in gap.items())
        + f"; mean image L2 distance {v['image_l2_distance']:.3f}.",
        "",
        "![Pareto fronts](../benchmarks/results/pareto.png)",
        "![Reward against KL](../benchmarks/results/reward_kl.png)",
        "![Learned variances](../benchmarks/results/variances.png)",
    ]
    return "\n".join(lines)


def plot_variances(report: dict, path: Path) -> None:
    """exp(v[t]) of each base model and MSDDA's composed std / sigma_t at w = (0.5, 0.5), per DDIM step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = report["variance"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, ratios in v["variance_ratio_per_step"].items():
        if ratios:
            ax.plot(
                range(len(ratios)), ratios, marker="o", ms=3, label=f"{name}: learned variance / sigma_t^2"
            )
    composed = [r**2 for r in v["composed_std_over_sigma"]]
    ax.plot(
        range(len(composed)), composed, "k--", label="MSDDA at w=(0.5, 0.5): composed variance / sigma_t^2"
    )
    ax.axhline(1.0, color="grey", lw=0.8, label="epsilon blend (sigma_t^2)")
    ax.set_xlabel("DDIM step (0 = most noisy)")
    ax.set_ylabel("variance / sigma_t^2")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reward_kl(report: dict, path: Path) -> None:
    """Fronts against KL: per weight, ``E[sum w_i r_i]`` against the mean path KL for every method and curve
    point, each method's points joined in order of KL, with lines of constant ``J_w`` at the base beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report.get("objective_J", {})
    if not entries:
        return
    fig, axes = plt.subplots(1, len(J_WEIGHTS), figsize=(13, 4.2), sharey=False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    legend_done = False
    for ax, w1 in zip(axes, J_WEIGHTS):
        drawn = False
        for family, color in colors.items():
            points = []
            for label, rows in entries.items():
                if label.split("@")[0] != family:
                    continue
                for row in rows:
                    if abs(row["weights"][0] - w1) < 1e-9:
                        points.append((row["kl"], row["combined"], label))
            if not points:
                continue
            drawn = True
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=4, color=color, label=family)
            for kl, value, label in points:
                ax.annotate(
                    label.partition("@")[2],
                    (kl, value),
                    fontsize=6,
                    xytext=(3, 2),
                    textcoords="offset points",
                )
        ax.set_title(f"w = ({w1:g}, {1 - w1:g})", fontsize=9)
        if not drawn:  # the grid has no point at this weight
            ax.text(0.5, 0.5, "no grid point at this weight", ha="center", transform=ax.transAxes)
            continue
        if not legend_done:
            ax.legend(fontsize=7)
            legend_done = True
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        y_lo, y_hi = ax.get_ylim()
        for row in entries.get("msdda", []):
            if abs(row["weights"][0] - w1) < 1e-9:  # the J_w level line through MSDDA's point
                xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
                ax.plot(xs, [row["J"] + report["beta"] * x for x in xs], "k:", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel("mean path KL from the reference (nats, log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("E[sum w_i r_i] (rewards on their card's scale)")
    fig.suptitle(f"Reward against KL; dotted: MSDDA's J_w level at beta = {report['beta']:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--oracle-images", type=int, default=1024)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--curve-images", type=int, default=128, help="images per point of the extra curve points"
    )
    parser.add_argument(
        "--no-curves", action="store_true", help="only the main sweep (no target betas, N, scales)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--write-readme", action="store_true", help="write the tables into the docs (docs/results.md)"
    )
    parser.add_argument("--from-json", action="store_true", help="re-render from results/composition.json")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and the figures")
    args = parser.parse_args()
    results = args.results
    if args.from_json:
        report = json.loads((results / "composition.json").read_text())
        plot_variances(report, results / "variances.png")
        plot_reward_kl(report, results / "reward_kl.png")
        if args.write_readme:
            write_section("composition-results", render(report))
        print(render(report))
        return

    config, home = load_config(args.config), msdda_home()
    config = with_composition(config, path_kl=True)
    beta = base_beta(config)
    base_dirs = [train_base_model(config, name, home).path for name in config.objective_names]
    oracle_dirs = []
    for w1 in ORACLE_WEIGHTS:
        cfg = oracle_config(config, [w1, 1 - w1])
        oracle_dirs.append(train_base_model(cfg, "weighted_sum", home).path)
    specs = [str(p) for p in base_dirs]
    sweep = sweep_job(config, home, specs, args.methods.split(","), None, args.num_images, mlflow=False)
    hypervolumes, objective_J = summarise(sweep, beta)
    curves = {}
    for label, method, settings in [] if args.no_curves else curve_variants(beta):
        if method not in args.methods.split(","):
            continue
        print(f"curve point {label}", file=sys.stderr)
        result = sweep_job(
            with_composition(config, **settings), home, specs, [method], None, args.curve_images, mlflow=False
        )
        hv, objective = summarise(result, beta)
        curves[label] = {"method": method, "settings": settings, "num_images": args.curve_images}
        curves[label]["points"] = result["methods"][method]["points"]
        hypervolumes[label], objective_J[label] = hv[method], objective[method]
    report = {
        "sweep": sweep,
        "beta": beta,
        "hypervolume": hypervolumes,
        "objective_J": objective_J,
        "curves": curves,
        "matched_nfe": matched_nfe(sweep),
        "oracle_images": args.oracle_images,
        "oracle": oracle_comparison(config, home, base_dirs, oracle_dirs, args.oracle_images),
        "variance": variance_report(config, home, base_dirs, args.oracle_images),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "composition.json").write_text(json.dumps(report, indent=1))
    shutil.copyfile(sweep["plot"], results / "pareto.png")
    plot_variances(report, results / "variances.png")
    plot_reward_kl(report, results / "reward_kl.png")
    table = render(report)
    if args.write_readme:
        write_section("composition-results", table)
    print(json.dumps(report) if args.json else table)


if __name__ == "__main__":
    main()
