"""Prefect deployments (the team setup): scheduled training and on-demand composition.

=======================================  =====================================================================
deployment                               what it runs
=======================================  =====================================================================
``train-base-models/scheduled-training`` the flow ``train-base-models`` on a cron schedule (default
                                         ``0 3 * * *``, UTC): retrain and register a base model per objective
``compose/on-demand``                    the flow ``compose``, no schedule: trigger it with weights (and
                                         optionally prompts), e.g. ``prefect deployment run
                                         compose/on-demand -p weights='[0.3, 0.7]'``
=======================================  =====================================================================

Both carry ``config_path`` (absolute), ``overrides`` (the ``--set`` and ``--device`` of ``msdda deploy``,
applied on top of the config at every run) and ``home`` (``$MSDDA_HOME`` at deploy time) as default
parameters, so a run finds the same reference model and config wherever it executes; the MLflow store comes
from the executing process's ``MLFLOW_TRACKING_URI`` (default: ``$MSDDA_HOME/mlflow.db``).

Two ways to execute them, both against a real Prefect server (``prefect server start``; ``PREFECT_API_URL``
set):

- :func:`serve_deployments` registers them and executes their runs in this process's subprocesses until
  stopped (``prefect.serve`` semantics: schedules are paused on shutdown);
- :func:`deploy_to_pool` registers them on a process work pool (created if absent) with this code folder as
  their source and returns at once; ``prefect worker start --pool NAME`` then executes the runs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.errors import MsddaError, first_line

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 3 * * *"
TRAINING_NAME = "scheduled-training"
COMPOSE_NAME = "on-demand"
TAGS = ["msdda"]
SOURCE = Path(__file__).resolve().parents[1]  # the folder holding the ``flows`` package
COMPOSE_DEPLOYMENT = f"compose/{COMPOSE_NAME}"
"""The on-demand deployment's full name (``prefect deployment run compose/on-demand ...``)."""


class DeploymentError(MsddaError, ValueError):
    """One-line, user-facing deployment problem (no server, bad cron, unusable work pool)."""


def api_url() -> str:
    """The Prefect API URL (``PREFECT_API_URL``, from the environment or the active profile), checked to
    answer (:func:`flows.prefect_api.check_api`).

    Without one Prefect runs in ephemeral mode, whose temporary server cannot hold deployments for anyone.
    """
    from prefect.settings import PREFECT_API_URL

    from flows.prefect_api import check_api

    url = PREFECT_API_URL.value()
    if not url:
        raise DeploymentError(
            "deployments need a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api "
            "(ephemeral mode cannot hold deployments)"
        )
    return check_api(url)


def check_cron(cron: str) -> str:
    """``cron`` itself, refused with a :class:`DeploymentError` unless it is a valid cron expression."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", list)()
        reason = errors[0]["msg"] if errors else first_line(exc)
        reason = reason.removeprefix("Value error, ")
        raise DeploymentError(f"invalid cron schedule {cron!r}: {reason}") from None
    return cron


def _parameters(
    config_path: str | Path | None, home: str | Path | None, overrides: list[str] | None = None
) -> dict[str, Any]:
    from training.storage import msdda_home

    return {
        "config_path": str(Path(config_path).expanduser().resolve()) if config_path else None,
        "home": str(Path(home or msdda_home()).expanduser().resolve()),
        "overrides": list(overrides or []),
    }


def _flow(name: str, from_source: bool):
    """The flow named ``name`` (:data:`flows.pipeline.FLOWS`): the imported one (served), or loaded from
    :data:`SOURCE` (for a work pool) by its entrypoint ``flows/pipeline.py:<function>``."""
    from flows import pipeline

    flow = pipeline.FLOWS[name]
    if from_source:
        from prefect import Flow

        return Flow.from_source(source=str(SOURCE), entrypoint=f"flows/pipeline.py:{flow.fn.__name__}")
    return flow


def training_deployment(
    cron: str = DEFAULT_CRON,
    config_path: str | Path | None = None,
    home: str | Path | None = None,
    from_source: bool = False,
    overrides: list[str] | None = None,
) -> RunnerDeployment:
    """``train-base-models/scheduled-training``: every objective of the config, on ``cron`` (UTC)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.registry import CHAMPION_MIN_RISE_SE

    extra = {} if from_source else {"entrypoint_type": EntrypointType.MODULE_PATH}
    return _flow("train-base-models", from_source).to_deployment(
        TRAINING_NAME,
        schedule=Cron(check_cron(cron), timezone="UTC"),
        paused=False,
        parameters=_parameters(config_path, home, overrides),
        tags=TAGS,
        description="Retrain and register a base model per objective (the champion alias moves when the "
        f"reward rose by more than {CHAMPION_MIN_RISE_SE:g} standard errors and the kernel check passed).",
        **extra,
    )


def compose_deployment(
    config_path: str | Path | None = None,
    home: str | Path | None = None,
    from_source: bool = False,
    overrides: list[str] | None = None,
) -> RunnerDeployment:
    """``compose/on-demand``: no schedule; each run takes ``weights`` (and optionally prompts, models,
    method, ...)."""
    from prefect.deployments.runner import EntrypointType

    extra = {} if from_source else {"entrypoint_type": EntrypointType.MODULE_PATH}
    return _flow("compose", from_source).to_deployment(
        COMPOSE_NAME,
        paused=False,
        parameters=_parameters(config_path, home, overrides),
        tags=TAGS,
        description="Compose the registered champions (or the given models) for one weight vector.",
        **extra,
    )


def _describe(deployment: RunnerDeployment, deployment_id) -> dict[str, Any]:
    return {
        "name": f"{deployment.flow_name}/{deployment.name}",
        "id": str(deployment_id),
        "schedules": [getattr(s.schedule, "cron", None) for s in deployment.schedules or []],
        "parameters": deployment.parameters,
    }


def serve_deployments(
    cron: str = DEFAULT_CRON,
    config_path: str | Path | None = None,
    home: str | Path | None = None,
    on_ready: Callable[[list[dict[str, Any]]], None] | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Register both deployments and execute their runs until interrupted (blocking; ``prefect.serve`` with
    the deployment ids reported to ``on_ready`` once they are registered). Schedules are paused on
    shutdown."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    api_url()
    deployments = [
        training_deployment(cron, config_path=config_path, home=home, overrides=overrides),
        compose_deployment(config_path=config_path, home=home, overrides=overrides),
    ]
    runner = Runner(name="msdda-serve", pause_on_shutdown=True)
    described = [_describe(d, runner.add_deployment(d)) for d in deployments]
    if on_ready is not None:
        on_ready(described)
    previous = signal.signal(signal.SIGINT, partial(_stop_gracefully, runner))
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_gracefully(runner, signum, frame) -> None:
    """Ctrl-C: stop the runner the way Prefect stops it on SIGTERM, from inside its event loop, so that its
    shutdown (pausing the schedules, reaping flow-run processes) runs to the end. A KeyboardInterrupt raised
    into asyncio's loop instead can be swallowed by a cancelled task group and leave the process hanging. A
    second Ctrl-C, or one before the runner has started, interrupts at once."""
    if not runner.started or runner.stopping or runner._loop is None:
        raise KeyboardInterrupt
    runner.stopping = True
    runner.execute_in_background(runner.astop)


def deploy_to_pool(
    pool: str,
    cron: str = DEFAULT_CRON,
    config_path: str | Path | None = None,
    home: str | Path | None = None,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Register both deployments on the process work pool ``pool`` (created if absent) and return at once;
    their code is pulled from :data:`SOURCE` by ``prefect worker start --pool POOL`` on this machine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    if not pool or not pool.strip() or "/" in pool or "%" in pool:
        raise DeploymentError(f"invalid work pool name {pool!r}")
    api_url()
    check_cron(cron)
    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                work_pool = client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type=ProcessWorker.type,
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
            except ObjectAlreadyExists:  # created concurrently
                work_pool = client.read_work_pool(pool)
    if work_pool.type != ProcessWorker.type:
        raise DeploymentError(
            f"work pool '{pool}' is of type '{work_pool.type}'; use a process work pool "
            f"(`prefect work-pool create {pool} --type process`) "
            "or `msdda deploy` without --pool"
        )
    deployments = [
        training_deployment(cron, config_path=config_path, home=home, from_source=True, overrides=overrides),
        compose_deployment(config_path=config_path, home=home, from_source=True, overrides=overrides),
    ]
    return [{**_describe(d, d.apply(work_pool_name=pool)), "work_pool": pool} for d in deployments]
