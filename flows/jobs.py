"""The product's jobs as plain functions: train (and register), compose, sweep. The CLI and the Prefect flows
are thin layers over these.

Each job takes a validated :class:`~configs.schema.PipelineConfig` and ``$MSDDA_HOME``, logs an MLflow run,
and returns a JSON-ready dict.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

from composition.methods import DEFAULT_METHOD
from configs.errors import MsddaError, first_line
from configs.schema import MAX_PROMPT_CHARS, PipelineConfig

if TYPE_CHECKING:
    from flows.registry import ResolvedModel

Runner = Literal["auto", "sequential", "dask"]
"""How ``msdda run`` trains the base models: one after the other in-process, in parallel on Dask, or ``auto``
(:func:`parallel_workers` decides)."""


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' chatter (log lines, load bars) off the terminal: the CLI's process
    and each Dask worker's."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def parallel_workers(pending: int, idle_cpus: int, device: str) -> int:
    """How many Dask workers ``runner="auto"`` trains ``pending`` base models on: one per model up to the idle
    CPUs, or 0 (one after the other, in-process) when fewer than two models need training, fewer than two
    CPUs are idle, or the device is not the CPU (one accelerator is shared, not split). On 2 cores the default
    pair trains in 15.3 minutes so, against 19.5 one after the other (docs/getting-started.md)."""
    if device != "cpu" or pending < 2 or idle_cpus < 2:
        return 0
    return min(pending, idle_cpus)


class PromptError(MsddaError, ValueError):
    """Prompts that cannot be used: an empty or unreadable prompts file, a blank or too long prompt (one
    line)."""


def _check_runtime(config: PipelineConfig) -> None:
    """A device this machine lacks (``runtime.device: cuda`` without CUDA), or a ``model.source: pretrained``
    checkpoint folder that is missing or incomplete, fails in one line before any loading, reward building
    or MLflow run; the stages resolve ``runtime`` again where they place their tensors."""
    from training.device import resolve_runtime
    from training.reference.loader import check_reference

    resolve_runtime(config.runtime)
    check_reference(config)


def _reachable(home: Path) -> None:
    from flows.registry import check_reachable

    check_reachable(home)


# ------------------------------------------------------------------------------------------------- training


def train_job(
    config: PipelineConfig,
    home: Path,
    objective: str,
    register: bool = True,
    mlflow: bool = True,
    progress: bool = True,
    progress_lines: bool = False,
) -> dict:
    """Train (or reuse) the base model for ``objective``, log the run to MLflow and register the model version
    (the ``champion`` alias moves to it when it passes :func:`flows.registry.champion_verdict`).
    ``progress_lines``: a line per tenth of the run instead of a bar (a Dask worker, beside others)."""
    from contextlib import nullcontext

    import mlflow as mlflow_lib

    from flows.tracking import mlflow_run
    from training.base_model import train_base_model
    from training.rewards import load_reward

    spec = config.objective(objective)
    _check_runtime(config)  # before the reward, which may train its evaluator CNN
    load_reward(spec.name, config, home, spec.options)  # one-line error before any heavy work
    if mlflow or register:
        _reachable(home)
    train = config.train_for(objective)
    params = {
        "objective": objective,
        "beta": spec.beta or train.beta,
        "method": train.method,
        "iterations": train.iterations,
    }
    name = f"train {objective} beta={params['beta']:g}"
    context = mlflow_run(home, name, params=params) if mlflow else nullcontext((None, None))
    registered = None
    with context as (run, log_iteration):
        if progress_lines:
            log_iteration = _with_progress_lines(log_iteration, objective, train.iterations)
        result = train_base_model(config, objective, home, progress=progress, log_metrics=log_iteration)
        run_id = run.info.run_id if run is not None else None
        if run is not None:
            mlflow_lib.log_metrics(
                {f"eval_{k}": v for k, v in result.as_dict().items() if isinstance(v, float)}
            )
    # Registered only once its run is closed: a store failure while closing it must not leave a new version
    # (and the champion alias) pointing at a run that reports failure.
    if register:
        from flows.registry import register_base_model

        registered = register_base_model(home, result.path, run_id=run_id)
    return {**result.as_dict(), "mlflow_run_id": run_id, "registered": registered}


def _with_progress_lines(log_metrics, objective: str, iterations: int):
    """``log_metrics`` that also prints ``<objective>: iteration i/n, <s> s, <min> min left`` every tenth of
    the run (flushed at once: a Dask worker's output reaches the terminal line by line)."""
    every = max(1, iterations // 10)

    def log(metrics) -> None:
        if log_metrics is not None:
            log_metrics(metrics)
        if metrics.iteration % every and metrics.iteration != iterations:
            return
        left = metrics.seconds / metrics.iteration * (iterations - metrics.iteration) / 60
        kernel = f", kernel error {metrics.kernel_error:.3f}" if math.isfinite(metrics.kernel_error) else ""
        print(
            f"{objective}: iteration {metrics.iteration}/{iterations}, {metrics.seconds:.0f} s, "
            f"{left:.1f} min left{kernel}",
            flush=True,
        )

    return log


# ------------------------------------------------------------------------------------------------ resolving


def resolve_models(config: PipelineConfig, home: Path, specs: list[str] | None = None) -> list[ResolvedModel]:
    """Base models for ``specs``: a folder path is used as is (no registry name or version), anything else is
    a registry spec (``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``). No specs: the config's objectives at
    ``@champion``."""
    from flows.registry import ResolvedModel, resolve
    from training.card import CARD_FILE

    specs = list(specs or config.objective_names)
    if not specs:
        from composition.engine import CompositionError

        raise CompositionError("no base models named and the config lists no objectives")
    models = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and ("/" in spec or (path / CARD_FILE).exists()):
            models.append(ResolvedModel(path))
        else:
            _reachable(home)
            models.append(resolve(home, spec))
    return models


def describe_models(models: list[ResolvedModel]) -> list[dict]:
    """Objective, registry name/version (when resolved from the registry) and path of each base model."""
    from training.card import BaseModelCard

    rows = []
    for model in models:
        row = {"objective": BaseModelCard.read(model.path).objective, "path": str(model.path)}
        if model.name is not None and model.version is not None:
            row.update(name=model.name, version=model.version)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- compose


MAX_IMAGES = 10_000
"""The most images one compose, or one sweep point, samples: more is a slip of the keyboard that would run
for hours and hold every image in memory (a few GB at 512 pixels); several composes make more."""


def check_num_images(num_images: int) -> int:
    """``num_images`` when it is at most :data:`MAX_IMAGES` (``--num-images`` or ``composition.num_images``);
    a one-line error otherwise."""
    if num_images > MAX_IMAGES:
        from composition.engine import CompositionError

        raise CompositionError(f"{num_images} images asked for: at most {MAX_IMAGES} per run")
    return num_images


def read_prompts(path: str | os.PathLike, limit: int = MAX_IMAGES) -> list[str]:
    """The prompts of a text file, one per line (surrounding spaces stripped, blank lines skipped). Reading
    stops after ``limit`` prompts: the images cycle through the prompts, so no run uses more than
    :data:`MAX_IMAGES` of them, and a huge file costs no more than that."""
    prompts = []
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    prompts.append(line.strip())
                    if len(prompts) == limit:
                        break
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise PromptError(f"{path}: cannot read prompts ({reason})") from None
    if not prompts:
        raise PromptError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    return prompts


def check_prompts(prompts: list[str] | None) -> list[str] | None:
    """``prompts`` with surrounding spaces stripped; ``None`` (the config's prompts) stays ``None``. An empty
    list, a blank prompt or one longer than :data:`~configs.schema.MAX_PROMPT_CHARS` is a :class:`PromptError`
    (before any model loads)."""
    if prompts is None:
        return None
    cleaned = [str(p).strip() for p in prompts]
    if not cleaned or not all(cleaned):
        raise PromptError("prompts must be non-empty text (got an empty list or a blank prompt)")
    for number, prompt in enumerate(cleaned, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"prompt {number} ({prompt[:24]!r}...) is {len(prompt):,} characters long; a prompt takes "
                f"at most {MAX_PROMPT_CHARS:,} (text encoders read only its first 77 tokens, or fewer)"
            )
    return cleaned


def _check_rewards_take_prompts(ensemble, prompts: list[str]) -> None:
    """Score one blank latent (and its image) per distinct prompt, so that a reward that cannot read a prompt
    (digit_alignment on a prompt that names no digit) fails in one line before any sampling."""
    import torch

    from composition.engine import score_generated

    distinct = list(dict.fromkeys(prompts))
    unet = ensemble.pipe.unet
    shape = (len(distinct), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.zeros(shape)
    images = ensemble.decode(latents.to(unet.device))
    score_generated(ensemble, SimpleNamespace(latents=latents, images=images, prompts=distinct))


def composition_folder_name(method: str, weights: list[float], seed: int) -> str:
    """The default image folder's name: method, weights, seed, the time to the second and a random suffix, so
    that composes started in the same second never share a folder (and publishing one never replaces
    another's: see :func:`compose_job`)."""
    tag = "_".join(f"{w:g}" for w in weights)
    return f"{method}-w{tag}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def compose_job(
    config: PipelineConfig,
    home: Path,
    weights,
    specs: list[str] | None = None,
    method: str = DEFAULT_METHOD,
    num_images: int | None = None,
    seed: int | None = None,
    out_dir: Path | None = None,
    mlflow: bool = True,
    prompts: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Sample images for one weight vector with ``method``, cycling through ``prompts`` (default: the config's
    evaluation prompts; only the first ``num_images`` are used, and listed); save them (PNG + manifest + grid)
    in ``out_dir`` (default: a new folder under ``$MSDDA_HOME/compositions``) and log an MLflow run with the
    weights, models and versions, the prompts, the rewards, the NFE and the images.

    ``out_dir`` is checked before any sampling (:func:`~composition.engine.check_image_folder`): an existing
    one is replaced only when compose wrote it."""
    from composition.engine import (
        GRID_FILE,
        CompositionError,
        check_image_folder,
        generate,
        get_method,
        load_ensemble,
        parse_weights,
        score_generated,
        staged_images,
        write_images,
    )
    from composition.evaluation import image_grid
    from training.rewards import mean_and_se

    get_method(method)  # a one-line error before any loading
    _check_runtime(config)
    prompts = check_prompts(prompts)
    options = config.composition
    num_images = check_num_images(num_images or options.num_images)
    seed = options.seed if seed is None else seed
    weight_list = parse_weights(weights, len(specs or config.objective_names))  # before any download or load
    default_dir = home / "compositions" / composition_folder_name(method, weight_list, seed)
    target = check_image_folder(out_dir or default_dir)  # before any sampling
    image_dir = target.path
    if mlflow:
        _reachable(home)
    resolved = resolve_models(config, home, specs)
    ensemble = load_ensemble(
        config, home, [m.path for m in resolved], progress=progress, prompts=prompts and prompts[:num_images]
    )
    ensemble.prompts = ensemble.prompts[:num_images]  # the prompts the images use (they cycle through them)
    _check_rewards_take_prompts(ensemble, ensemble.prompts)
    generated = generate(
        ensemble, method, weight_list, options, num_images=num_images, seed=seed, progress=progress
    )
    scores = score_generated(ensemble, generated)
    stats = {k: mean_and_se(v) for k, v in scores.items()}
    models = describe_models(resolved)
    payload = {
        "method": method,
        "weights": weight_list,
        "objectives": ensemble.objectives,
        "models": models,
        "prompts": ensemble.prompts,
        "rewards": {k: v[0] for k, v in stats.items()},
        "reward_se": {k: v[1] for k, v in stats.items()},
        "nfe": generated.nfe_per_image,
        "reward_calls": generated.reward_calls_per_image,
        "num_images": num_images,
        "seed": seed,
        "seconds": round(generated.seconds, 3),
    }
    # Images, manifest and grid are written into a staged folder and published at image_dir only when all of
    # them are there (staged_images). The MLflow run is logged after, from the published folder: a kill in
    # between leaves a complete folder without a run, never a run whose images are missing (the other order
    # could leave that, and a failed publish would leave a run for images nobody can see).
    title = (
        f"{method} w = {', '.join(f'{w:g}' for w in weight_list)} ({', '.join(ensemble.objectives)}), "
        f"seed {seed}: {min(num_images, 64)} of {num_images} images"
    )
    try:
        with staged_images(target) as staged:
            write_images(generated.images, generated.prompts, staged, payload)
            image_grid(generated.images, staged / GRID_FILE, generated.prompts, scores, title=title)
    except OSError as exc:  # e.g. the folder filled with other files while sampling, or a full disk
        raise CompositionError(
            f"cannot write the image folder {image_dir}: {exc.strerror or exc}; nothing there was replaced"
        ) from None
    payload.update(image_dir=str(image_dir), mlflow_run_id=None)
    if mlflow:
        payload["mlflow_run_id"] = _log_compose(home, payload, image_dir)
    return payload


def _log_compose(home: Path, payload: dict, out_dir: Path) -> str:
    import mlflow

    from flows.tracking import mlflow_run

    params = {
        "method": payload["method"],
        "weights": ",".join(f"{w:g}" for w in payload["weights"]),
        "models": ",".join(
            f"{m.get('name', m['objective'])}" + (f"/{m['version']}" if "version" in m else "")
            for m in payload["models"]
        ),
        "num_images": payload["num_images"],
        "seed": payload["seed"],
        **prompt_params(payload["prompts"]),
    }
    weights = ",".join(f"{w:g}" for w in payload["weights"])
    name = f"compose w={weights} {payload['method']}"
    with mlflow_run(home, name, params=params, tags={"msdda.job": "compose"}) as (
        run,
        _,
    ):
        metrics = {f"reward_{k}": v for k, v in payload["rewards"].items()}
        metrics.update({f"reward_se_{k}": v for k, v in payload["reward_se"].items()})
        mlflow.log_metrics(
            {
                **metrics,
                "nfe": payload["nfe"],
                "reward_calls": payload["reward_calls"],
                "seconds": payload["seconds"],
            }
        )
        mlflow.log_artifacts(str(out_dir), "images")  # the PNGs, their grid and the manifest
        return run.info.run_id


PARAM_LIMIT = 6000
"""MLflow's limit on a parameter value's length (characters)."""


def prompt_params(prompts: list[str]) -> dict[str, object]:
    """MLflow parameters for a prompt set: ``num_prompts`` and ``prompts`` (a JSON list; when longer than
    MLflow allows, a pointer to the manifest logged with the images instead)."""
    text = json.dumps(prompts)
    if len(text) > PARAM_LIMIT:
        text = f"{len(prompts)} prompts: see images/manifest.json"
    return {"num_prompts": len(prompts), "prompts": text}


# --------------------------------------------------------------------------------------------------- sweep


def sweep_key(
    config: PipelineConfig, folders: list[Path], methods: list[str], grid: int, num_images: int
) -> str:
    """Cache key of a sweep: the base models' content and every setting that changes its numbers."""
    from training.storage import content_hash

    composition = config.composition.model_dump(mode="json")
    if composition["beta"] is None:  # unset target beta: the keys of sweeps made before the setting existed
        del composition["beta"]
    for how_it_runs in ("compile", "routed_weights", "plan"):  # how the UNet runs, not what it computes
        del composition[how_it_runs]
    payload = {
        "models": [content_hash(f) for f in folders],
        "methods": methods,
        "grid": grid,
        "num_images": num_images,
        "composition": composition,
        "sampling": config.sampling.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def sweep_job(
    config: PipelineConfig,
    home: Path,
    specs: list[str] | None = None,
    methods: list[str] | None = None,
    grid: int | None = None,
    num_images: int | None = None,
    mlflow: bool = True,
    progress: bool = True,
) -> dict:
    """Every method over the weight grid (cached under ``$MSDDA_HOME/sweeps/<key>``): ``sweep.json``, the
    Pareto plot of all methods ``pareto.png``, one per method (``fronts/<method>.png``), a labelled image grid
    per method and weight (``grids/<method>/w<weights>.png``) and one per method with a row per weight
    (``grids/<method>.png``), all logged to one MLflow run."""
    from composition.engine import get_method, load_ensemble
    from composition.evaluation import image_grid, plot_fronts, sweep, sweep_grid
    from composition.methods import METHODS
    from training.storage import staged_directory

    options = config.composition
    methods = [get_method(m).name for m in (methods or options.methods or METHODS)]
    _check_runtime(config)
    grid = grid or options.grid
    num_images = check_num_images(num_images or options.num_images)
    if mlflow:
        _reachable(home)
    resolved = resolve_models(config, home, specs)
    folders = [m.path for m in resolved]
    key = sweep_key(config, folders, methods, grid, num_images)
    final = home / "sweeps" / key
    cached = (final / "sweep.json").exists()
    if not cached:
        ensemble = load_ensemble(config, home, folders, progress=progress)
        # keep_existing: the folder is content-addressed; a concurrent sweep that finished first is kept
        with staged_directory(final, prefix=".sweep-", keep_existing=True) as tmp:
            rows: dict[str, list] = {}  # method -> (weights, first images, their rewards) per point
            prompts: list[str] = []  # every point samples the same prompts and initial noise
            columns = 6

            def save_grid(method: str, weights: list[float], sampled: dict) -> None:
                name = "w" + "_".join(f"{w:g}" for w in weights)
                label = ", ".join(f"{w:g}" for w in weights)
                image_grid(
                    sampled["images"],
                    tmp / "grids" / method / f"{name}.png",
                    sampled["prompts"],
                    sampled["rewards"],
                    title=f"{method} w = {label} ({', '.join(ensemble.objectives)})",
                )
                rewards = {k: v[:columns].clone() for k, v in sampled["rewards"].items()}  # not the batch
                rows.setdefault(method, []).append((weights, sampled["images"][:columns].clone(), rewards))
                prompts[:] = prompts or sampled["prompts"][:columns]

            result = sweep(
                ensemble, options, methods, grid, num_images, on_point=save_grid, progress=progress
            )
            for method in methods:
                sweep_grid(
                    rows[method],
                    prompts,
                    tmp / "grids" / f"{method}.png",
                    columns=columns,
                    title=f"{method}: a row per weight vector w = ({', '.join(ensemble.objectives)}); "
                    "columns: the same prompts and seeds",
                )
            result["models"] = describe_models(resolved)
            (tmp / "sweep.json").write_text(json.dumps(result, indent=1))
            plot_fronts(result, tmp / "pareto.png")
            for method, data in result["methods"].items():
                plot_fronts({**result, "methods": {method: data}}, tmp / "fronts" / f"{method}.png")
    result = json.loads((final / "sweep.json").read_text())
    result.update(plot=str(final / "pareto.png"), out_dir=str(final), cached=cached, mlflow_run_id=None)
    if mlflow:
        result["mlflow_run_id"] = _log_sweep(home, result, final)
    return result


def _log_sweep(home: Path, result: dict, folder: Path) -> str:
    import mlflow

    from flows.tracking import mlflow_run

    params = {
        "methods": ",".join(result["methods"]),
        "objectives": ",".join(result["objectives"]),
        **{k: v for k, v in result["settings"].items() if k != "seconds"},
    }
    points = len(next(iter(result["methods"].values()))["points"]) if result["methods"] else 0
    name = f"sweep {points}x{len(result['methods'])}"  # weight vectors x methods
    with mlflow_run(home, name, params=params, tags={"msdda.job": "sweep"}) as (run, _):
        mlflow.log_metrics({f"hypervolume_{m}": v["hypervolume"] for m, v in result["methods"].items()})
        mlflow.log_artifacts(str(folder))
        return run.info.run_id
