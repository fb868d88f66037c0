"""MLflow tracking: the default store is SQLite plus an artifact folder under ``$MSDDA_HOME``;
``MLFLOW_TRACKING_URI`` (e.g. an ``mlflow server``) overrides it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

EXPERIMENT = "msdda"


def tracking_uri(home: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``$MSDDA_HOME/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (``http(s)://``) rather than a local store."""
    return uri.startswith(("http://", "https://"))


def run_url(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """The MLflow UI page of a run on the server at ``base``, or of one of its ``artifact`` (a path in it)."""
    from urllib.parse import quote

    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return url + (f"/artifactPath/{quote(artifact)}" if artifact else "")


def mlflow_link(home: Path, run_id: str, artifact: str | None = None) -> str | None:
    """The http address of run ``run_id`` (or of its ``artifact``) in the tracking server's UI when
    ``MLFLOW_TRACKING_URI`` names a server; ``None`` for a local store, which has no address to link to."""
    uri = tracking_uri(home)
    if not is_remote(uri):
        return None
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    return run_url(uri, run.info.experiment_id, run_id, artifact)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextmanager
def store_lock(home: Path):
    """Serialise, across processes on one machine, the writers of a SQLite store (a no-op for other stores).

    MLflow migrates a new SQLite database when a client first opens it; two processes doing so at once fail.
    """
    import fcntl

    database = sqlite_path(tracking_uri(home))
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(client, home: Path) -> str:
    """The id of the ``msdda`` experiment, created if absent (tolerating a concurrent creator).

    With a local store its artifacts go to ``$MSDDA_HOME/mlartifacts``; a tracking server picks its own
    artifact location (a client-side path would mean nothing to other machines).
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None if is_remote(tracking_uri(home)) else (home / "mlartifacts").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(EXPERIMENT)  # created concurrently
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def mlflow_run(home: Path, run_name: str, params: dict | None = None, tags: dict | None = None):
    """An active MLflow run in the ``msdda`` experiment; yields ``(run, log_iteration)``."""
    import mlflow

    home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(home))
    with store_lock(home):
        mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(tracking_uri(home)), home))
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
                    "ess_share": metrics.ess_share,
                    "reward_spread": metrics.reward_spread,
                },
                step=metrics.iteration,
                synchronous=False,  # a background thread writes; training does not wait on the store
            )

        try:
            yield run, log_iteration
        finally:
            mlflow.flush_async_logging()
