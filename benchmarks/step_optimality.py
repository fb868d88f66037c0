"""Kernel-level check of MSDDA's exactness claim: is each step kernel at the step-level optimum?

    python benchmarks/step_optimality.py [--states 16] [--actions 256] [--json] [--write-readme]
    python benchmarks/step_optimality.py --profile digit_alignment,prototype_match:4 --betas 0.01,0.1
    python benchmarks/step_optimality.py --config configs/quadratic.yaml --fit-ceiling   (fit_ceiling.py)

1. Trains (or reuses) the config's base models and the oracles (the same trainer on ``w_1 R_1 + w_2 R_2``)
   at w = (0.25, 0.75), (0.5, 0.5), (0.75, 0.25).
2. Held-out states: ``--states`` chains of the reference and of each base model (fixed seeds, apart from
   the training and evaluation seeds), every state of every DDIM step.
3. At each state, ``--actions`` reference actions in antithetic pairs, each scored by every objective's
   step reward exactly as the trainer scores it (``DiffusionStepProblem.clean_estimate``, decode, reward).
4. The step-level optimum ``p_ref exp(r / beta)`` of each base model's reward, and of ``sum_i w_i r_i`` at
   each weight, estimated from those actions (``training/step/optimum.py``: self-normalised,
   noise-corrected with independent halves, bootstrap standard errors).
5. The kernels compared with it: each base model; at each weight MSDDA's composed kernel, DB's kernel, the
   oracle model and RGG's guided step (also at each one-hot weight, against that objective's optimum). All of
   them are the product's own kernel functions (``composition.methods``).

``--json`` prints ``{"base_models": {objective: err}, "rgg": {"scale", "single": {objective: err}},
"composition": [{"weights": [w1, w2], "msdda": err, "db": err, "oracle": err, "rgg": err}], ...}`` with
``err = {"relative_drift_error", "cosine", "drift_ratio", "variance_ratio", "path_relative_error",
"path_cosine", "path_drift_ratio", "path_error_without_last_two", "path_cosine_without_last_two", "mc_se",
"per_step": [...]}``: means over steps and path-pooled figures, also without the last two steps (§5.8)
(``mc_se``: the Monte-Carlo standard error of the relative drift error; ``mc_se_all`` has all of them).
A base model's ``err`` also has ``on_reference_chains``: its path figures at the reference's chains alone,
the states the fit ceiling is scored on.
``--write-readme`` writes its block into docs/results.md (``benchmarks/readme_section.py`` finds the file that
holds the markers) and the plot ``benchmarks/results/step_optimality.png``.
``--profile`` measures only the optimum of the named rewards at reference states (no base models), to
choose a reward's scale and beta.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from composition_results import ORACLE_WEIGHTS, oracle_config
from fit_ceiling import SETS, fit_ceiling, parse_sets, render_fit_ceiling
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script
from tqdm.auto import tqdm

from composition.batched import REFERENCE, load_adapter
from composition.engine import load_ensemble
from composition.methods import Batch, epsilon_blend, guided_step, msdda
from composition.msdda import compose_gaussian
from configs import load_config
from training.base_model import evaluation_problem, train_base_model
from training.card import load_base_model
from training.rewards import combine_quadratics
from training.step.chain import run_chain
from training.step.kernel import GaussianStep
from training.step.optimum import (
    FIELDS,
    PATH_FIELDS,
    StepOptimum,
    bootstrap_counts,
    drift_energies,
    estimate_optimum,
    exact_optimum,
    kernel_errors,
    optimum_summary,
    path_errors,
)
from training.storage import atomic_file, msdda_home
from training.trainer import (
    linearised_proposal,
    step_reward_gradient,
    target_diagnostics,
    target_weights,
)

RESULTS = Path(__file__).parent / "results"
DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
STATE_SEED = 20_261_126


def single_kernel(composer, adapter: str, log_variance):
    """The kernel function of one adapter on the composer's UNet (a base model or an oracle)."""

    def kernel(batch: Batch, x: torch.Tensor, step: int):
        eps = composer.epsilons(x, step, batch, [adapter])[0]
        return composer.schedule.kernel(x, eps, step, log_variance)

    return kernel


def held_out_states(composer, sources: dict, embeds, uncond, num_chains: int, prompts: int):
    """``{step: (x [n, ...], prompt index [n])}``: every state of ``num_chains`` chains of each source."""
    unet = composer.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    steps = range(len(composer.schedule))
    per_step = {step: ([], []) for step in steps}
    for offset, kernel in enumerate(sources.values()):
        generator = torch.Generator().manual_seed(STATE_SEED + offset)
        index = torch.randint(0, prompts, (num_chains,), generator=generator)
        x_T = torch.randn((num_chains, *shape), generator=generator)
        batch = Batch(embeds[index], uncond)
        chain = run_chain(
            composer.schedule,
            x_T,
            lambda x, step, kernel=kernel, batch=batch: kernel(batch, x, step),
            generator,
            keep=steps,
            diagnose=False,
        )
        for step in steps:
            per_step[step][0].append(chain.states[step])
            per_step[step][1].append(index)
    return {step: (torch.cat(xs), torch.cat(ids)) for step, (xs, ids) in per_step.items()}


def step_rewards(problem, rewards: dict, x, index, actions, step, chunk: int) -> dict[str, torch.Tensor]:
    """``{name: r [M, n]}``: each :class:`~training.rewards.Reward`'s step reward of every action, exactly as
    the trainer scores it (one decode shared by the image rewards)."""
    scores = {name: [] for name in rewards}
    for first in range(0, x.shape[0], chunk):
        part = slice(first, first + chunk)
        cond = problem.make_cond(index[part])
        m, b = actions.shape[0], x[part].shape[0]
        clean = problem.clean_estimate(x[part], actions[:, part], step, cond)
        images = problem.decode(clean) if any(not r.on_latents for r in rewards.values()) else None
        for name, reward in rewards.items():
            value = reward.score(clean, cond["prompts"] * m, lambda _, images=images: images)
            scores[name].append(value.view(m, b).double())
    return {name: torch.cat(parts, dim=1) for name, parts in scores.items()}


def scaled_rewards(ensemble) -> dict:
    """The ensemble's rewards, each on its base model's card scale (``(R - offset) / scale``)."""
    scaled = {}
    for model, (name, reward) in zip(ensemble.models, ensemble.rewards.items()):
        scale = model.card.reward_scale
        quadratic = reward.quadratic.scaled(1 / scale.scale) if reward.quadratic else None
        scaled[name] = replace(
            reward,
            fn=lambda inputs, prompts, reward=reward, scale=scale: scale.standardise(reward(inputs, prompts)),
            quadratic=quadratic,
        )
    return scaled


def exact_targets(problem, rewards: dict, targets: dict, x, index, step, chunk: int) -> dict:
    """``{target: StepOptimum}`` in closed form, for latent quadratic rewards (``--exact``): each target's
    ``sum_i c_i r_i`` is one quadratic (:func:`~training.rewards.combine_quadratics`), whose optimum
    :meth:`~training.sd_problem.DiffusionStepProblem.quadratic_optimum` gives exactly (beta folded into the
    coefficients)."""
    out = {}
    for target, coefficients in targets.items():
        quadratic = combine_quadratics([(rewards[name].quadratic, c) for name, c in coefficients.items()])
        means, variances, references = [], [], []
        for first in range(0, x.shape[0], chunk):
            part = slice(first, first + chunk)
            cond = problem.make_cond(index[part])
            optimum = problem.quadratic_optimum(x[part], step, cond, 1.0, quadratic)
            means.append(optimum.mean.flatten(1))
            variances.append(optimum.variance.expand_as(optimum.mean).flatten(1))
            references.append(problem.reference(x[part], step, cond).mean.flatten(1))
        out[target] = exact_optimum(torch.cat(means), torch.cat(variances), torch.cat(references))
    return out


def composed_from_exact_bases(exact: dict, objectives: list[str], reference) -> dict:
    """``--exact`` only: MSDDA's closed form and DB's epsilon blend applied to the *exact* base optima at each
    weight, ``{"msdda_exact_bases:<w1>": GaussianStep, "db_exact_bases:<w1>": ...}``. This separates the
    composition rule from the base models' fit: with bases at their optimum MSDDA is exact (docs/design.md
    §2.4), while DB averages the drifts with ``w`` instead of ``w / var`` and keeps ``sigma_t^2`` (§2.7)."""
    shape = reference.mean.shape
    drifts = torch.stack([exact[o].drift_a for o in objectives]).view(len(objectives), *shape)
    tail = (1,) * (len(shape) - 1)
    variances = torch.stack([exact[o].variance for o in objectives]).view(len(objectives), shape[0], *tail)
    ref_var = reference.variance.double()
    out = {}
    for w1 in ORACLE_WEIGHTS:
        w = [w1, 1 - w1]
        mean, var = compose_gaussian(drifts, variances, w, torch.zeros_like(drifts[0]), ref_var)
        out[f"msdda_exact_bases:{w1}"] = GaussianStep(reference.mean + mean.float(), var.float())
        blended = sum(wi * d for wi, d in zip(w, drifts))
        out[f"db_exact_bases:{w1}"] = GaussianStep(reference.mean + blended.float(), reference.variance)
    return out


def aggregate(per_step: list[dict], replicates: list[list[dict]]) -> dict:
    """Mean over steps of each figure (NaN steps left out) and the path-pooled figures, with their bootstrap
    standard errors (0 without replicates: an exact optimum)."""

    def mean_over_steps(rows: list[dict], name: str) -> float:
        values = [r[name] for r in rows if math.isfinite(r[name])]
        return sum(values) / len(values) if values else math.nan

    def path(rows: list[dict]) -> dict:
        return path_errors([r["energy"] for r in rows])

    result = {name: mean_over_steps(per_step, name) for name in FIELDS}
    result.update(path(per_step))
    early = path(per_step[:-2])  # the last two steps' tiny drift can dominate the pooled error (§5.8)
    result.update(
        path_error_without_last_two=early["path_relative_error"],
        path_cosine_without_last_two=early["path_cosine"],
    )
    se = {}
    for name in (*FIELDS, *PATH_FIELDS):
        values = [
            (path(rows) if name in PATH_FIELDS else {name: mean_over_steps(rows, name)})[name]
            for rows in replicates
        ]
        draws = torch.tensor(values, dtype=torch.float64)
        draws = draws[torch.isfinite(draws)]
        se[name] = float(draws.std()) if len(draws) > 1 else (0.0 if not replicates else math.nan)
    per_step = [{k: v for k, v in row.items() if k != "energy"} for row in per_step]
    return {**result, "mc_se": se["relative_drift_error"], "mc_se_all": se, "per_step": per_step}


def load_models(config, home, no_oracle: bool):
    """The ensemble of the config's base models, its composer, and the oracles' kernels (by ``w_1``) put on
    the composer's UNet as extra adapters."""
    base_dirs = [train_base_model(config, name, home).path for name in config.objective_names]
    oracle_dirs = {
        w1: train_base_model(oracle_config(config, [w1, 1 - w1]), "weighted_sum", home).path
        for w1 in (() if no_oracle else ORACLE_WEIGHTS)
    }
    ensemble = load_ensemble(config, home, base_dirs)
    composer = ensemble.composer(config.composition)
    oracles = {}
    for w1, path in oracle_dirs.items():
        loaded = load_base_model(path)
        load_adapter(composer.unet, f"oracle_{int(w1 * 100)}", loaded.lora, loaded.card.lora)
        oracles[w1] = single_kernel(composer, f"oracle_{int(w1 * 100)}", loaded.log_variance)
    return ensemble, composer, oracles


def kernels_and_targets(composer, objectives: list[str], beta: float, oracles: dict):
    """``kernels``: name -> kernel function ``(batch, x, step)``; ``targets``: name -> the coefficients of
    each objective's reward in ``log pi* - log p_ref``. A kernel named ``kind:key`` is measured against
    the target :func:`target_of` names."""
    kernels = {
        f"base:{m.objective}": single_kernel(composer, m.objective, m.log_variance) for m in composer.models
    }
    targets = {name: {name: 1.0 / beta} for name in objectives}
    for w1 in ORACLE_WEIGHTS:
        w = [w1, 1 - w1]
        kernels[f"msdda:{w1}"] = lambda batch, x, step, w=w: msdda(composer, w, batch, x, step)
        kernels[f"db:{w1}"] = lambda batch, x, step, w=w: epsilon_blend(composer, w, batch, x, step)
        if w1 in oracles:
            kernels[f"oracle:{w1}"] = oracles[w1]
        targets[f"w:{w1:g}"] = {objectives[0]: w1 / beta, objectives[1]: (1 - w1) / beta}
    return kernels, targets


def target_of(kernel_name: str) -> str:
    """The optimum a kernel ``kind:key`` is measured against: the combined one when ``key`` is a weight
    ``w_1``, else the objective ``key``'s."""
    rest = kernel_name.partition(":")[2]
    try:
        return f"w:{float(rest):g}"
    except ValueError:
        return rest


def rgg_weights(ensemble) -> dict[str, list[float]]:
    """RGG's kernels to measure: ``rgg:<objective>`` at the one-hot weights (against that objective's optimum)
    and ``rgg:<w1>`` at each oracle weight; none when a reward has no gradient."""
    if not all(reward.differentiable for reward in ensemble.rewards.values()):
        return {}
    objectives = ensemble.objectives
    weights = {
        f"rgg:{name}": [float(i == j) for j in range(len(objectives))] for i, name in enumerate(objectives)
    }
    weights.update({f"rgg:{w1}": [w1, 1 - w1] for w1 in ORACLE_WEIGHTS})
    return weights


def measure(args) -> dict:
    config, home = load_config(args.config), msdda_home()
    if len(config.objective_names) != 2:
        raise SystemExit("error: step_optimality compares two objectives; the config has a different number")
    ensemble, composer, oracles = load_models(config, home, args.no_oracle)
    torch.set_grad_enabled(False)
    objectives, schedule = ensemble.objectives, composer.schedule
    betas = {m.objective: m.beta for m in ensemble.models}
    if len(set(betas.values())) != 1:
        raise SystemExit(f"error: the base models' betas differ ({betas}); this check needs one target beta")
    beta = next(iter(betas.values()))
    kernels, targets = kernels_and_targets(composer, objectives, beta, oracles)
    embeds, uncond = ensemble.embeddings()
    problem = evaluation_problem(config, home, None)
    scaled = scaled_rewards(ensemble)

    def reference(batch, x, step):
        return schedule.kernel(x, composer.epsilons(x, step, batch, [REFERENCE])[0], step)

    started = time.perf_counter()
    sources = {"reference": reference, **{k: v for k, v in kernels.items() if k.startswith("base:")}}
    states = held_out_states(composer, sources, embeds, uncond, args.states, len(ensemble.prompts))
    generator = torch.Generator().manual_seed(STATE_SEED - 1)
    rgg = rgg_weights(ensemble)
    exact_bases = [f"{m}_exact_bases:{w1}" for w1 in ORACLE_WEIGHTS for m in ("msdda", "db")]
    names = [*kernels, *rgg, *(exact_bases if args.exact else [])]
    rows = {name: [] for name in names}
    replicate_rows = {name: [[] for _ in range(args.bootstrap)] for name in names}
    optimum_rows = {name: [] for name in targets}
    reference_energies = {name: [] for name in kernels if name.startswith("base:")}
    for step in tqdm(range(len(schedule)), desc="steps", disable=args.quiet):
        x, index = states[step]
        batch = Batch(embeds[index], uncond)
        ref = reference(batch, x, step)
        if args.exact:
            exact = exact_targets(problem, scaled, targets, x, index, step, args.chunk)
        else:
            actions = ref.sample(generator, num=args.actions, antithetic=True)
            rewards = step_rewards(problem, scaled, x, index, actions, step, args.chunk)
            flat_actions, ref_mean = actions.flatten(2), ref.mean.flatten(1)
        kernel_steps = {name: kernel(batch, x, step) for name, kernel in kernels.items()}
        prompts = [ensemble.prompts[i] for i in index.tolist()]
        for name, weights in rgg.items():  # RGG's step at the state: the gradient of the weighted score
            score = ensemble.score_fn(weights, prompts, per_beta=True, differentiable=True)
            scale = config.composition.rgg_scale
            kernel_steps[name] = guided_step(composer, score, batch, x, step, scale)[0]
        if args.exact:
            kernel_steps.update(composed_from_exact_bases(exact, objectives, ref))
        bootstrap = 0 if args.exact else args.bootstrap
        counts = [bootstrap_counts(args.actions, x.shape[0], generator) for _ in range(bootstrap)]
        for target, coefficients in targets.items():
            if args.exact:
                optimum, replicas = exact[target], []
            else:
                log_weights = sum(c * rewards[name] for name, c in coefficients.items())
                optimum = estimate_optimum(flat_actions, ref_mean, log_weights)
                replicas = [estimate_optimum(flat_actions, ref_mean, log_weights, c) for c in counts]
            sigma = float(schedule.sigma[step])
            summary = optimum_summary(optimum, sigma)
            optimum_rows[target].append({"step": step, **summary})
            for name in (n for n in kernel_steps if target_of(n) == target):
                drift = (kernel_steps[name].mean - ref.mean).flatten(1)
                variance = kernel_steps[name].variance.expand_as(ref.mean).flatten(1).mean(1)
                energy = drift_energies(drift, optimum, sigma)
                rows[name].append({"step": step, **kernel_errors(drift, variance, optimum), "energy": energy})
                if name.startswith("base:"):  # the reference's chains alone: the fit ceiling's states
                    first = slice(0, args.states)
                    part = StepOptimum(*(getattr(optimum, f.name)[first] for f in fields(StepOptimum)))
                    reference_energies[name].append(drift_energies(drift[first], part, sigma))
                for r, replica in enumerate(replicas):
                    replicate_rows[name][r].append(
                        {
                            **kernel_errors(drift, variance, replica),
                            "energy": drift_energies(drift, replica, sigma),
                        }
                    )
    results = {name: aggregate(rows[name], [] if args.exact else replicate_rows[name]) for name in names}

    def on_reference(name: str) -> dict:
        everything, early = path_errors(reference_energies[name]), path_errors(reference_energies[name][:-2])
        return {**everything, "path_error_without_last_two": early["path_relative_error"]}

    return {
        "objectives": objectives,
        "beta": beta,
        "exact": bool(args.exact),
        "states_per_step": int(states[0][0].shape[0]),
        "actions": 0 if args.exact else args.actions,
        "bootstrap": 0 if args.exact else args.bootstrap,
        "seconds": time.perf_counter() - started,
        "optimum": optimum_rows,
        "base_models": {
            name: {**results[f"base:{name}"], "on_reference_chains": on_reference(f"base:{name}")}
            for name in objectives
        },
        "rgg": {
            "scale": config.composition.rgg_scale,
            "single": {name: results[f"rgg:{name}"] for name in objectives if f"rgg:{name}" in results},
        },
        "composition": [
            {
                "weights": [w1, 1 - w1],
                **{
                    m: results[f"{m}:{w1}"]
                    for m in ("msdda", "db", "oracle", "rgg", "msdda_exact_bases", "db_exact_bases")
                    if f"{m}:{w1}" in results
                },
            }
            for w1 in ORACLE_WEIGHTS
        ],
    }


def profile(args) -> dict:
    """The optimum alone, at reference states, for each ``--profile`` reward and ``--betas`` value: how far it
    moves per step, how much narrower than the reference it is, and how concentrated the weights are. No base
    model is needed; this is how a reward's scale and beta are chosen (docs/design.md §5.6)."""
    from training.rewards import load_reward

    config, home = load_config(args.config), msdda_home()
    torch.set_grad_enabled(False)
    problem = evaluation_problem(config, home, None)
    rewards = {}
    for spec in args.profile.split(","):
        name, _, sharpness = spec.partition(":")
        options = {"sharpness": float(sharpness)} if sharpness else {}
        rewards[spec] = load_reward(name, config, home, options)
    betas = [float(b) for b in args.betas.split(",")]
    kappas = [float(k) for k in args.proposal_kappas.split(",")] if args.proposal_kappas else []
    schedule, generator = problem.schedule, torch.Generator().manual_seed(STATE_SEED)
    proposals = torch.Generator().manual_seed(STATE_SEED + 1)  # leaves the profile's own draws as they are
    index = torch.randint(0, len(problem.prompts), (args.states,), generator=generator)
    cond = problem.make_cond(index)
    x_T = torch.randn((args.states, *problem.latent_shape), generator=generator)
    steps = range(len(schedule))
    chain = run_chain(schedule, x_T, lambda x, step: problem.reference(x, step, cond), generator, keep=steps)
    rows = {f"{name} beta={beta:g}": [] for name in rewards for beta in betas}
    for step in tqdm(steps, desc="steps", disable=args.quiet):
        x = chain.states[step]
        ref = problem.reference(x, step, cond)
        actions = ref.sample(generator, num=args.actions, antithetic=True)
        scores = step_rewards(problem, rewards, x, index, actions, step, args.chunk)
        sigma = float(schedule.sigma[step])
        for name, r in scores.items():
            for beta in betas:
                optimum = estimate_optimum(actions.flatten(2), ref.mean.flatten(1), r / beta)
                summary = optimum_summary(optimum, sigma)
                row = {"step": step, **summary, "tilt": float((r / beta).std(0).mean())}
                if kappas:
                    drift = (optimum.drift_a + optimum.drift_b) / 2
                    gap = ((optimum.drift_a - optimum.drift_b) ** 2).sum() / 4
                    row["optimum_noise"] = float((gap / (drift**2).sum()).sqrt())
                    row["proposal"] = proposal_check(
                        problem, rewards[name], (x, index, ref, step), drift, beta, kappas, args, proposals
                    )
                rows[f"{name} beta={beta:g}"].append(row)
    return rows


def proposal_check(problem, reward, state, optimum_drift, beta, kappas, args, generator) -> dict:
    """The trainer's target with ``--proposal-actions`` antithetic actions from the reference shifted by
    ``kappa`` times the linearised optimum's drift (``train.gradient_proposal``), against the optimum's drift
    from all ``--actions``: ``{kappa: {ess_share, relative_error, cosine}}``, each the mean of
    ``--proposal-draws`` draws. The relative error is pooled over the states, ``sqrt(sum |d - d*|^2 / sum
    |d*|^2)``; it includes the ``--actions`` estimate's own noise."""
    x, index, ref, step = state

    def step_reward(x_part, actions, step, cond):
        images = problem.decode(problem.clean_estimate(x_part, actions, step, cond))
        return reward(images, cond["prompts"] * len(actions)).view(len(actions), -1)

    gradient = torch.cat(
        [
            step_reward_gradient(
                SimpleNamespace(step_reward=step_reward),
                x[part],
                ref.mean[part],
                step,
                problem.make_cond(index[part]),
            )
            for part in (slice(i, i + args.chunk) for i in range(0, len(x), args.chunk))
        ]
    )
    target = optimum_drift.double()
    out = {}
    for kappa in kappas:
        proposal = linearised_proposal(ref, gradient, beta, kappa)
        figures = []
        for _ in range(args.proposal_draws):
            actions = proposal.sample(generator, num=args.proposal_actions, antithetic=True)
            r = step_rewards(problem, {"r": reward}, x, index, actions, step, args.chunk)["r"]
            log_ratio = torch.stack([ref.log_prob(a) - proposal.log_prob(a) for a in actions]).double()
            weights = target_weights(r, beta, log_ratio)
            drift = torch.einsum("mb,mbd->bd", weights, actions.flatten(2).double()) - ref.mean.flatten(1)
            figures.append(
                {
                    "ess_share": target_diagnostics(r, weights)[0],
                    "relative_error": float(((drift - target) ** 2).sum().sqrt() / (target**2).sum().sqrt()),
                    "cosine": float(torch.nn.functional.cosine_similarity(drift, target, dim=1).mean()),
                }
            )
        out[f"{kappa:g}"] = {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}
    return out


def render_profile(rows: dict, args) -> str:
    lines = [
        f"`python benchmarks/step_optimality.py --profile {args.profile} --betas {args.betas} --states "
        f"{args.states}`: the optimum `p_ref exp(r / beta)` at {args.states} reference states per DDIM step, "
        f"{args.actions} antithetic actions each; means over the steps (extremes in brackets).",
        "",
        "| target | drift / sigma | var* / sigma^2 (min over steps) | ESS share (min) "
        "| tilt: std(r / beta) (max) |",
        "|---|---|---|---|---|",
    ]
    for target, steps in rows.items():

        def mean(key: str, steps=steps) -> float:
            return sum(r[key] for r in steps) / len(steps)

        lines.append(
            f"| {target} | {mean('drift_over_sigma'):.3f} "
            f"| {mean('variance_over_sigma2'):.3f} ({min(r['variance_over_sigma2'] for r in steps):.3f}) "
            f"| {mean('ess_share'):.3f} ({min(r['ess_share'] for r in steps):.3f}) "
            f"| {mean('tilt'):.3f} ({max(r['tilt'] for r in steps):.3f}) |"
        )
    return "\n".join(lines)


def render_proposals(rows: dict, args) -> str:
    """The ``--proposal-kappas`` table: the trainer's target per kappa against the optimum."""
    with_proposal = {target: steps for target, steps in rows.items() if steps and "proposal" in steps[0]}
    lines = [
        f"`python benchmarks/step_optimality.py --profile {args.profile} --betas {args.betas} --states "
        f"{args.states} --proposal-kappas {args.proposal_kappas}`: the trainer's target from "
        f"{args.proposal_actions} antithetic actions, drawn from the reference shifted by kappa times the "
        "linearised optimum's drift (`train.gradient_proposal`), against the optimum from all "
        f"{args.actions} actions, at {args.states} reference states per DDIM step; means over the steps and "
        f"{args.proposal_draws} draws.",
        "",
        "| target | kappa | ESS share | relative error of the drift (pooled) | cosine |",
        "|---|---|---|---|---|",
    ]
    floors = []
    for target, steps in with_proposal.items():
        for kappa in steps[0]["proposal"]:

            def mean(key: str, steps=steps, kappa=kappa) -> float:
                return sum(r["proposal"][kappa][key] for r in steps) / len(steps)

            lines.append(
                f"| {target} | {kappa} | {mean('ess_share'):.3f} | {mean('relative_error'):.3f} "
                f"| {mean('cosine'):.3f} |"
            )
        floors.append(f"{target}: {sum(r['optimum_noise'] for r in steps) / len(steps):.3f}")
    lines += [
        "",
        f"The {args.actions}-action optimum's own relative noise (split halves), the error's floor: "
        + "; ".join(floors)
        + ".",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- report


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _cell(err: dict, name: str) -> str:
    if name not in err:  # a report saved before the figure existed
        return "-"
    value, se = _nan_for_none(err[name]), _nan_for_none(err["mc_se_all"].get(name))
    return f"{value:.3f} ± {se:.3f}" if math.isfinite(se) and se > 0 else f"{value:.3f}"


def render(report: dict) -> str:
    columns = (*FIELDS, "path_relative_error", "path_cosine")
    header = (
        "| kernel | relative drift error | cosine | drift ratio | variance ratio | path-pooled error "
        "| path-pooled cosine |\n|---|---|---|---|---|---|---|"
    )
    objectives = ", ".join(f"`{o}`" for o in report["objectives"])
    states = (
        f"{report['states_per_step']} held-out states per DDIM step (chains of the reference and of each "
        "base model)"
    )
    if report.get("exact"):
        how = (
            "the optimum in closed form at every state (docs/design.md §5.7), so every figure is exact; "
            "figures averaged over the steps"
        )
    else:
        how = (
            f"{report['actions']} antithetic reference actions per state, figures averaged over the steps ± "
            f"bootstrap Monte-Carlo SE ({report['bootstrap']} replicates)"
        )
    lines = [
        f"Objectives {objectives}, beta {report['beta']}; {states}, {how}; {report['seconds']:.0f} s. "
        "Path-pooled: summed over the steps in units of sigma_t before the ratio, so each step counts by how "
        "far its optimum moves (docs/design.md §5.3).",
        "",
        header,
    ]
    for name, err in report["base_models"].items():
        lines.append(f"| `{name}` base model | " + " | ".join(_cell(err, f) for f in columns) + " |")
    rgg = report.get("rgg", {})
    for name, err in rgg.get("single", {}).items():
        lines.append(
            f"| RGG (scale {rgg['scale']:g}) on `{name}` alone | "
            + " | ".join(_cell(err, f) for f in columns)
            + " |"
        )
    for row in report["composition"]:
        w = ", ".join(f"{v:g}" for v in row["weights"])
        methods = ("msdda", "db", "oracle", "rgg", "msdda_exact_bases", "db_exact_bases")
        for method in [m for m in methods if m in row]:
            label = {
                "msdda": "MSDDA",
                "db": "DB",
                "oracle": "oracle",
                "rgg": "RGG",
                "msdda_exact_bases": "MSDDA of the exact base optima",
                "db_exact_bases": "DB of the exact base optima",
            }[method]
            lines.append(
                f"| {label}, w = ({w}) | " + " | ".join(_cell(row[method], f) for f in columns) + " |"
            )
    lines += [
        "",
        "The optimum itself (mean over steps): drift per dimension in units of sigma_t, var*/sigma_t^2, "
        "effective sample size share of the M weights, noise share of the naive |d*|^2 (steps where the "
        "optimum's drift is below the noise left out):",
        "",
        "| target | drift / sigma | var* / sigma^2 | ESS share | noise share |",
        "|---|---|---|---|---|",
    ]
    for target, steps in report["optimum"].items():
        mean = {k: _finite_mean([s[k] for s in steps]) for k in steps[0] if k != "step"}
        lines.append(
            f"| {target} | {mean['drift_over_sigma']:.3f} | {mean['variance_over_sigma2']:.3f} | "
            f"{mean['ess_share']:.3f} | {mean['noise_share']:.3f} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = {f"{name} base": err for name, err in report["base_models"].items()}
    middle = report["composition"][len(report["composition"]) // 2]
    w = ", ".join(f"{v:g}" for v in middle["weights"])
    series.update({f"{m} w=({w})": middle[m] for m in ("msdda", "db", "oracle") if m in middle})
    for axis, field in zip(axes, ("cosine", "relative_drift_error", "variance_ratio")):
        for label, err in series.items():
            steps = [r["step"] for r in err["per_step"]]
            axis.plot(steps, [r[field] for r in err["per_step"]], marker="o", ms=3, label=label)
        axis.set_xlabel("DDIM step")
        axis.set_title(field.replace("_", " "))
        if field == "relative_drift_error":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def finite_or_none(value):
    """JSON has no NaN: non-finite numbers become ``null``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def _nan_for_none(value):
    """The inverse of :func:`finite_or_none` for a report read back from JSON."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return value


def fit_ceiling_main(args) -> None:
    """``--fit-ceiling``: measure (or re-render ``--from-json``), print, and with ``--write-readme`` save the
    JSON and write the table into docs/design.md §5.7."""
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        report = fit_ceiling(load_config(args.config), msdda_home(), args)
    if args.write_readme:
        RESULTS.mkdir(exist_ok=True)
        with atomic_file(RESULTS / "fit_ceiling.json") as tmp:
            tmp.write_text(json.dumps(finite_or_none(report), indent=1))
        write_section("fit-ceiling", render_fit_ceiling(report), DESIGN)
    print(json.dumps(finite_or_none(report)) if args.json else render_fit_ceiling(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--states", type=int, default=16, help="chains per source (reference, each model)")
    parser.add_argument(
        "--actions", type=int, default=256, help="reference actions per state (multiple of 4)"
    )
    parser.add_argument("--bootstrap", type=int, default=32, help="bootstrap replicates for the MC errors")
    parser.add_argument("--chunk", type=int, default=16, help="states per UNet call when scoring actions")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--write-readme", action="store_true", help="write the tables into the docs (docs/results.md)"
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracles (no training of them)")
    parser.add_argument(
        "--exact",
        action="store_true",
        help="the optimum in closed form instead of Monte Carlo: latent quadratic rewards with "
        "train.x0_estimate current_eps only (configs/quadratic.yaml); results go to the "
        "step-optimality-exact block of docs/results.md",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="only profile the optimum of these rewards (NAME or prototype_match:SHARPNESS, comma-separated) "
        "at reference states; no base models",
    )
    parser.add_argument("--betas", default="0.01", help="with --profile: comma-separated betas")
    parser.add_argument(
        "--proposal-kappas",
        default=None,
        help="with --profile: also score the trainer's target under train.gradient_proposal = each of these "
        "(comma-separated; 0 is the plain reference), against the optimum from all --actions",
    )
    parser.add_argument("--proposal-actions", type=int, default=8, help="the trainer's actions per state")
    parser.add_argument("--proposal-draws", type=int, default=4, help="draws averaged per kappa")
    parser.add_argument("--from-json", default=None, help="re-render a report saved by --json (no measuring)")
    ceiling = parser.add_argument_group("--fit-ceiling (benchmarks/fit_ceiling.py)")
    ceiling.add_argument(
        "--fit-ceiling",
        action="store_true",
        help="regress each LoRA target set onto the exact optimum (latent quadratic objectives only)",
    )
    ceiling.add_argument("--pool", type=int, default=512, help="reference chains the adapter is fitted on")
    ceiling.add_argument("--held-out", type=int, default=128, help="reference chains it is scored on")
    ceiling.add_argument("--iterations", type=int, default=400)
    ceiling.add_argument("--eval-every", type=int, default=100)
    ceiling.add_argument("--chains", type=int, default=32, help="pool chains per iteration")
    ceiling.add_argument("--steps", type=int, default=4, help="random steps per chain and iteration")
    ceiling.add_argument("--lr", type=float, default=3e-3)
    ceiling.add_argument(
        "--sets",
        default=",".join(f"{name}:{rank}" for name, rank in SETS),
        help="LoRA target sets and ranks to fit, SET:RANK comma-separated",
    )
    args = parser.parse_args()
    if args.fit_ceiling:
        try:
            args.sets = parse_sets(args.sets)
        except ValueError as exc:
            parser.error(str(exc))
        fit_ceiling_main(args)
        return
    if args.profile:
        rows = (
            _nan_for_none(json.loads(Path(args.from_json).read_text())) if args.from_json else profile(args)
        )
        text = render_proposals(rows, args) if args.proposal_kappas else render_profile(rows, args)
        if args.write_readme:
            write_section("step-proposal" if args.proposal_kappas else "step-profile", text)
        both = render_profile(rows, args) + ("\n\n" + text if args.proposal_kappas else "")
        print(json.dumps(finite_or_none(rows)) if args.json else both)
        return
    if args.actions < 256 and not args.json:
        print(f"note: {args.actions} actions per state (the check asks for at least 256)", file=sys.stderr)
    report = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    report = _nan_for_none(report)
    if args.write_readme:
        RESULTS.mkdir(exist_ok=True)
        stem = "step_optimality_exact" if report.get("exact") else "step_optimality"
        (RESULTS / f"{stem}.json").write_text(json.dumps(finite_or_none(report), indent=1))
        plot(report, RESULTS / f"{stem}.png")
        write_section(stem.replace("_", "-"), render(report))
    print(json.dumps(finite_or_none(report)) if args.json else render(report))


if __name__ == "__main__":
    main()
