"""The ``msdda`` command line.

Every subcommand takes ``--json`` and then prints a single JSON object on stdout (progress goes to stderr). Bad
input exits with code 2 and a one-line ``error: ...`` on stderr, without a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="msdda",
    help="Multi-objective alignment of diffusion models: step-level RL base models composed with MSDDA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: the embedded default).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


class UsageError(Exception):
    """Bad user input: reported as one line on stderr with exit code 2."""


def _quiet_libraries() -> None:
    """Keep third-party chatter (deprecations, load bars) off the terminal; our own bars stay."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


def _load(config_path: Path | None):
    from configs import load_config

    return load_config(config_path)


def _emit(payload: dict, as_json: bool, human: str) -> None:
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        typer.echo(human)


@app.command()
def pretrain(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Build the embedded reference model (cached under $MSDDA_HOME) and report its quality."""
    from training.embedded import pretrain_reference, result_dict
    from training.models import msdda_home

    cfg = _load(config)
    if cfg.model.source != "embedded":
        raise UsageError("`pretrain` builds the embedded model; this config uses a pretrained checkpoint")
    start = time.perf_counter()
    result = pretrain_reference(cfg, msdda_home(), progress=sys.stderr.isatty() or not json_output)
    payload = {**result_dict(result), "seconds": round(time.perf_counter() - start, 3)}
    human = (
        f"reference model: {result.path}\n"
        f"alignment accuracy: {result.alignment_accuracy:.3f} "
        f"(evaluator CNN held-out accuracy {result.classifier_test_accuracy:.3f})\n"
        f"{'cached' if result.cached else 'pretrained'} in {payload['seconds']:.1f} s"
        + (f" (built in {result.pretrain_seconds:.0f} s)" if result.cached else "")
    )
    _emit(payload, json_output, human)


@app.command()
def train(
    objective: Annotated[str, typer.Option("--objective", "-o", help="Reward to train for, e.g. ink_economy.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
    mlflow: Annotated[bool, typer.Option(help="Log per-iteration metrics to MLflow.")] = True,
) -> None:
    """Train one single-objective LoRA base model with the step-level trainer (cached under $MSDDA_HOME)."""
    from contextlib import nullcontext

    from training.base_model import train_base_model
    from training.models import msdda_home
    from training.rewards import load_reward

    cfg = _load(config)
    home = msdda_home()
    spec = cfg.objective(objective)
    load_reward(spec.name, cfg, home, spec.options)  # one-line error before any heavy work
    progress = sys.stderr.isatty() or not json_output
    run_id = None
    if mlflow:
        from flows.tracking import mlflow_run

        context = mlflow_run(home, f"train-{objective}", params={"objective": objective, "beta": spec.beta or cfg.train.beta,
                             "method": cfg.train.method, "iterations": cfg.train.iterations})
    else:
        context = nullcontext((None, None))
    with context as (active, log_iteration):
        result = train_base_model(cfg, objective, home, progress=progress, log_metrics=log_iteration)
        if active is not None:
            import mlflow as mlflow_lib

            run_id = active.info.run_id
            mlflow_lib.log_metrics({f"eval_{k}": v for k, v in result.as_dict().items() if isinstance(v, float)})
    payload = {**result.as_dict(), "mlflow_run_id": run_id}
    human = (
        f"base model '{objective}': {result.path}\n"
        f"reward {result.reward_before:.4f} -> {result.reward_after:.4f} "
        f"(+{result.rise_in_se:.1f} SE, SE {result.reward_se:.4f}); KL/step {result.kl:.4f}; "
        f"{result.unet_evaluations} UNet evaluations; {result.seconds:.0f} s" + (" (cached)" if result.cached else "")
    )
    _emit(payload, json_output, human)


@app.command()
def run(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """The main job: pretrain the reference (cached), train a base model per default objective (cached)."""
    from training.base_model import train_base_model
    from training.models import load_reference_pipeline, msdda_home
    from training.rewards import load_reward

    cfg = _load(config)
    home = msdda_home()
    for spec in cfg.objectives:  # unknown objectives or missing weights fail before any work
        load_reward(spec.name, cfg, home, spec.options)
    start = time.perf_counter()
    if cfg.model.source == "embedded":
        from training.embedded import pretrain_reference, result_dict

        reference = result_dict(pretrain_reference(cfg, home, progress=True))
    else:
        load_reference_pipeline(cfg)
        reference = {"path": cfg.model.pretrained}
    models = {spec.name: train_base_model(cfg, spec.name, home, progress=True).as_dict() for spec in cfg.objectives}
    pending = ["register", "sweep"]
    payload = {
        "reference": reference,
        "objectives": cfg.objective_names,
        "base_models": models,
        "stopped_after": "train",
        "not_yet_implemented": pending,
        "seconds": round(time.perf_counter() - start, 3),
    }
    lines = [f"reference model: {reference['path']}"
             + (f" (alignment accuracy {reference['alignment_accuracy']:.3f})" if "alignment_accuracy" in reference
                else "")]
    for name, m in models.items():
        lines.append(f"base model {name}: reward {m['reward_before']:.4f} -> {m['reward_after']:.4f} "
                     f"({m['rise_in_se']:+.1f} SE), KL/step {m['kl']:.4f}, {m['path']}")
    lines.append(f"STOPPED after training the base models: {', '.join(pending)} are not implemented yet.")
    _emit(payload, json_output, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps known errors to one line on stderr and exit code 2."""
    from configs import ConfigError
    from training.models import ModelLoadError
    from training.rewards import RewardError

    _quiet_libraries()
    try:
        app(args=argv, prog_name="msdda")
    except (ConfigError, ModelLoadError, RewardError, UsageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except SystemExit as exc:  # click's standalone mode: usage errors exit 2 with their own message
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
