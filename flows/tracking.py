"""MLflow tracking: the default store is SQLite plus an artifact folder under ``$MSDDA_HOME``;
``MLFLOW_TRACKING_URI`` (e.g. an ``mlflow server``) overrides it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

EXPERIMENT = "msdda"


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"


@contextmanager
def mlflow_run(home: Path, run_name: str, params: dict | None = None, tags: dict | None = None):
    """An active MLflow run in the ``msdda`` experiment; yields ``(run, log_iteration)``."""
    import mlflow

    home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(home))
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(home / "mlartifacts").as_uri())
        except mlflow.exceptions.MlflowException:
            pass  # created concurrently
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        if params:
            mlflow.log_params(params)

        def log_iteration(metrics) -> None:
            mlflow.log_metrics(
                {
                    "reward_mean": metrics.reward_mean,
                    "reward_std": metrics.reward_std,
                    "kl": metrics.kl,
                    "loss": metrics.loss,
                    "unet_evaluations": metrics.unet_evaluations,
                    "seconds": metrics.seconds,
                },
                step=metrics.iteration,
            )

        yield run, log_iteration
