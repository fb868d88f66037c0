"""Training one single-objective LoRA base model end to end.

The trained model is saved as a base-model folder (its card ``base_model.json``, the LoRA weights in
diffusers' format and the learned log-variance offset, if any; see :mod:`training.card`), written to a
temporary folder and renamed into place, so nothing half-written is ever visible.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from configs.schema import PipelineConfig
from training.card import (
    BaseModelCard,
    DamagedModelError,
    RewardScale,
    RewardSpec,
    load_base_model,
    save_base_model,
)
from training.reference.digits import default_prompts
from training.reference.loader import reference_pipeline
from training.rewards import load_reward, mean_and_se, rescaled
from training.storage import check_writable
from training.trainer import IterationMetrics, train


@dataclass(frozen=True)
class BaseModelResult:
    objective: str
    path: Path
    reward_before: float
    reward_after: float
    reward_se_before: float
    reward_se_after: float
    reward_se: float
    rise_in_se: float
    rise_in_unpaired_se: float
    kl: float
    seconds: float
    unet_evaluations: int
    cached: bool
    kernel_check: str = "off"
    """The held-out kernel check of ``train.eval_every`` (:mod:`training.step.kernel_check`): ``exact``,
    ``monte_carlo``, ``missing: <why>``, or ``off``."""
    kernel_error: float = math.nan
    """Its path error at the iteration kept (the best checked), NaN when it did not run."""
    kernel_cosine: float = math.nan
    kernel_check_iteration: int | None = None
    """The checked iteration whose weights were kept."""

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


# Settings added after models were first cached: at these values they are left out of the key, so models
# trained before they existed keep their keys (and their caches).
ADDED_SETTINGS = {
    "objective": {"scale": 1.0, "train": {}},
    "train": {
        "antithetic": False,
        "gradient_proposal": 0.0,
        "curvature_proposal": False,
        "lora_targets": "attention",
        "target_loss": "likelihood",
        "learning_rate_schedule": "constant",
        "states": "rollouts",
        "pool_batches": 16,
        "eval_every": 0,
        "kernel_check_chains": 8,
        "kernel_check_actions": 64,
        "max_kernel_error": 1.0,
    },
}


def _key_part(section: str, model) -> dict:
    data = model.model_dump(mode="json")
    return {k: v for k, v in data.items() if ADDED_SETTINGS.get(section, {}).get(k, object()) != v}


def run_key(config: PipelineConfig, objective: str, reference_hash: str) -> str:
    payload = {
        "objective": _key_part("objective", config.objective(objective)),
        "train": _key_part("train", config.train_for(objective)),
        "sampling": config.sampling.model_dump(mode="json"),
        "reference": reference_hash,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def model_folder(home: Path, objective: str, key: str) -> Path:
    """Where the base model of ``objective`` with run key ``key`` (:func:`run_key`) is saved."""
    return home / "base_models" / f"{objective}-{key}"


def untrained(config: PipelineConfig, objectives: list[str], home: Path) -> list[str]:
    """The ``objectives`` whose base model is not in ``home`` yet (for the embedded reference, which is built
    first if it is not cached; a pretrained reference's objectives are all listed, its hash being the
    checkpoint's whole content)."""
    if config.model.source != "embedded":
        return list(objectives)
    from training.reference.embedded import pretrain_reference

    reference_hash = pretrain_reference(config, home).reference_hash
    return [
        objective
        for objective in objectives
        if not model_folder(
            home, objective, run_key(config.for_objective(objective), objective, reference_hash)
        ).exists()
    ]


def train_base_model(
    config: PipelineConfig,
    objective: str,
    home: Path,
    progress: bool = True,
    log_metrics: Callable[[IterationMetrics], None] | None = None,
) -> BaseModelResult:
    """Train (or reuse) the base model for ``objective`` on ``config.runtime.device`` (evaluation sampling,
    rewards and the trainer alike; weights stay fp32, the trainer's autocast is ``train.mixed_precision``);
    see the module docstring for what is saved."""
    from training.device import resolve_device
    from training.sd_problem import DiffusionStepProblem

    device = resolve_device(config.runtime.device)  # a missing device fails here, in one line
    config = config.for_objective(objective)  # its own train overrides, for everything below
    spec = config.objective(objective)
    reward = load_reward(spec.name, config, home, spec.options)  # fails fast on unknown objectives
    trained_on = rescaled(reward, spec.scale)  # evaluation reports the raw reward
    pipe, reference_hash = reference_pipeline(config, home, progress)
    key = run_key(config, objective, reference_hash)
    final = model_folder(home, objective, key)
    cached = _verified_cache(final)
    if cached is not None:
        return BaseModelResult(**{**cached.metrics, "path": final, "cached": True})
    check_writable(final.parent)  # before the training, not after it

    train_cfg = config.train
    beta = spec.beta or train_cfg.beta
    prompts = train_cfg.prompts or default_prompts()
    problem = DiffusionStepProblem.from_config(pipe, trained_on, config).to(device)
    eval_index = torch.arange(train_cfg.eval_samples) % len(prompts)

    def evaluate(use_policy: bool):
        generator = torch.Generator().manual_seed(train_cfg.eval_seed)
        latents, eval_prompts, kl = problem.sample_latents(eval_index, generator, use_policy=use_policy)
        return reward.score(latents, eval_prompts, problem.decode).detach().cpu(), kl

    before, _ = evaluate(use_policy=False)
    problem.unet_evaluations = 0  # evaluation calls are not training cost
    checkpoint_dir = home / "checkpoints" / f"{objective}-{key}"
    start = time.perf_counter()
    result = train(
        problem,
        train_cfg.model_copy(update={"beta": beta}),
        checkpoint_dir,
        log_metrics,
        progress,
        device=device,
    )
    seconds = result.history[-1].seconds if result.history else time.perf_counter() - start
    train_evaluations = problem.unet_evaluations
    after, kl = evaluate(use_policy=True)

    # Before and after share prompts and seeds, so the rise's standard error is that of the paired
    # differences.
    mean_before, se_before = mean_and_se(before)
    mean_after, se_after = mean_and_se(after)
    rise, se = mean_and_se(after - before)
    unpaired_se = math.hypot(se_before, se_after)
    metrics = BaseModelResult(
        objective=objective,
        path=final,
        reward_before=mean_before,
        reward_after=mean_after,
        reward_se_before=se_before,
        reward_se_after=se_after,
        reward_se=se,
        rise_in_se=rise / se if se > 0 else math.inf,
        rise_in_unpaired_se=rise / unpaired_se if unpaired_se > 0 else math.inf,
        kl=kl,
        seconds=seconds,
        unet_evaluations=train_evaluations,
        cached=False,
        **kernel_check_fields(result.kernel_check),
    )
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one process writes
        save_trained(final, problem, config, spec, beta, reference_hash, metrics, result.history)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics


def kernel_check_fields(kernel_check: dict | None) -> dict:
    """:class:`BaseModelResult`'s kernel-check fields from :attr:`TrainResult.kernel_check`."""
    if kernel_check is None:
        return {}
    if kernel_check["missing"] is not None:
        return {"kernel_check": f"missing: {kernel_check['missing']}"}
    return {
        "kernel_check": "exact" if kernel_check["exact"] else "monte_carlo",
        "kernel_error": kernel_check["kernel_error"],
        "kernel_cosine": kernel_check["kernel_cosine"],
        "kernel_check_iteration": kernel_check["iteration"],
    }


def _verified_cache(final: Path) -> BaseModelCard | None:
    """The card of the cached base model in ``final`` once its files load and match the card's hashes;
    ``None`` when there is none, or when it is damaged (said on stderr): it is then retrained, and the new
    folder replaces the damaged one by a rename (:func:`training.card.save_base_model`). A folder the OS
    cannot read now is no damage: its :class:`~training.storage.ModelLoadError` passes, and nothing is
    retrained over it."""
    if not final.exists():
        return None
    try:
        return load_base_model(final).card
    except DamagedModelError as exc:  # a newer format's model (NewerFormatError) passes: never overwritten
        print(f"warning: {exc.problem}; retraining it now", file=sys.stderr)  # the remedy, being applied
        return None


def save_trained(final: Path, problem, config, spec, beta, reference_hash, metrics, history) -> None:
    """Save ``problem``'s trained adapter and variance with its card
    (:func:`training.card.save_base_model`)."""
    state = problem.trainable_state()
    info = {k: v for k, v in problem.reward.info.items() if k != "scale"}
    card = BaseModelCard(
        objective=spec.name,
        reward=RewardSpec(
            **{
                "name": spec.name,
                "options": spec.options,
                "differentiable": problem.reward.differentiable,
                **info,
            }
        ),
        reward_scale=RewardScale(scale=spec.scale),
        beta=beta,
        trainer=config.train.method,
        train=config.train.model_dump(mode="json"),
        lora=problem.lora_spec,
        learn_variance=config.train.learn_variance,
        reference_hash=reference_hash,
        reference=config.model.model_dump(mode="json"),
        scheduler=dict(problem.pipe.scheduler.config),
        sampling=config.sampling.model_dump(mode="json"),
        metrics={k: v for k, v in metrics.as_dict().items() if k not in ("path", "cached")},
        history=[asdict(m) for m in history],
    )
    lora = {k.removeprefix("lora."): v for k, v in state.items() if k.startswith("lora.")}
    save_base_model(final, card, lora, state.get("log_variance"))


def evaluation_problem(config: PipelineConfig, home: Path, base_model: Path | None, progress: bool = False):
    """A :class:`DiffusionStepProblem` on the reference, with ``base_model``'s adapter and variance loaded, on
    ``config.runtime.device``."""
    from training.device import resolve_device
    from training.rewards import Reward
    from training.sd_problem import DiffusionStepProblem

    loaded = load_base_model(base_model) if base_model is not None else None
    pipe, _ = reference_pipeline(config, home, progress)
    no_reward = Reward("none", False, lambda images, prompts: torch.zeros(len(images)))
    overrides = {}
    if loaded is not None:
        overrides = {
            "lora_rank": loaded.rank,
            "lora_targets": loaded.targets,
            "learn_variance": loaded.card.learn_variance,
        }
    problem = DiffusionStepProblem.from_config(pipe, no_reward, config, **overrides)
    if loaded is not None:
        state = {f"lora.{k}": v for k, v in loaded.lora.items()}
        if loaded.log_variance is not None:
            state["log_variance"] = loaded.log_variance
        problem.load_trainable_state(state)
    return problem.to(resolve_device(config.runtime.device))
