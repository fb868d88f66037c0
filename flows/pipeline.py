"""Prefect flows: thin orchestration over the plain jobs in ``flows.jobs``.

=====================  ====================================================================================
flow                   what it does
=====================  ====================================================================================
``pretrain-reference`` build (or reuse) the embedded reference model
``train-base-model``   train, log and register one base model (``champion``: ``registry.champion_verdict``)
``train-base-models``  fan ``train-base-model`` out over objectives: in-process, or on Dask (prefect-dask)
``compose``            on-demand composition for one weight vector (images + MLflow run)
``sweep``              every method over the weight grid: Pareto fronts, hypervolume, plots
``msdda-pipeline``     all of the above, in order (this is ``msdda run``)
=====================  ====================================================================================

Parameters are validated by Prefect with pydantic from the type hints. Flows take ``config_path`` (YAML,
default: the embedded default), ``overrides`` (``section.field=value`` strings applied on top, as
``--set`` does: ``configs.overrides``) and ``home`` (default ``$MSDDA_HOME``) so that they run the same
in-process, on a Dask worker or from a deployment. Each flow's work runs in a Prefect task (``pretrain``,
``train``, ``compose``, ``sweep``) that takes the one retry policy of :mod:`flows.retries`: a transient error
is tried again, an :class:`~configs.errors.MsddaError` never. :data:`FLOWS` holds every flow by name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from prefect import flow, task
from pydantic import Field

from composition.methods import DEFAULT_METHOD, MethodName
from flows.jobs import Runner
from flows.retries import retry_policy

PositiveInt = Annotated[int, Field(ge=1)]


def _context(
    config_path: str | None, home: str | None, overrides: list[str] | None = None, torch_threads: int = 0
):
    """The config and home of a flow or task run, with torch's threads set for this process:
    ``torch_threads`` when positive (a Dask worker's share), else the config's ``runtime.num_threads``."""
    from configs import load_config
    from training.device import configure_threads

    config = load_config(config_path, overrides or ())
    configure_threads(torch_threads or config.runtime.num_threads)
    return config, _home(home)


def _home(home: str | Path | None) -> Path:
    """``home``, or ``$MSDDA_HOME`` when it is not given."""
    from training.storage import msdda_home

    return Path(home) if home else msdda_home()


def _publish(
    key: str,
    table: list[dict],
    description: str,
    link: str | None = None,
    home: str | Path | None = None,
    run_id: str | None = None,
    artifact: str | None = None,
) -> None:
    """A Prefect table artifact, plus a link artifact to ``link`` (a local file); a no-op outside a flow run.

    When the MLflow tracking URI is a server (``http(s)://``) and ``run_id`` is given, the link goes to that
    run's page in the server's UI instead (to its ``artifact`` when given), which a remote Prefect UI can
    open; a ``file://`` URI means nothing off this machine.
    """
    from prefect.artifacts import create_link_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    create_table_artifact(table=table, key=key, description=description)
    target, text = None, Path(link).name if link else None
    if run_id and home is not None:
        from flows.tracking import mlflow_link

        target = mlflow_link(Path(home), run_id, artifact)
        text = f"MLflow run {run_id[:8]}" + (f": {artifact}" if artifact else "") if target else text
    if target is None and link:
        target = Path(link).resolve().as_uri()
    if target:
        create_link_artifact(link=target, link_text=text, key=f"{key}-plot", description=description)


# ----------------------------------------------------------------------------------------------------- tasks


@task(**retry_policy(retries=2), name="pretrain")
def pretrain_task(
    config_path: str | None = None, home: str | None = None, overrides: list[str] | None = None
) -> dict:
    from training.reference.loader import prepare_reference

    config, root = _context(config_path, home, overrides)
    return prepare_reference(config, root, progress=True)


@task(**retry_policy(), name="train", task_run_name="train {objective}")
def train_task(
    objective: str,
    config_path: str | None = None,
    home: str | None = None,
    torch_threads: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    from flows.jobs import quiet_libraries, train_job

    in_worker = torch_threads > 0  # a Dask worker's share of the cores
    if in_worker:  # as quiet as the CLI's process
        quiet_libraries()
    config, root = _context(config_path, home, overrides, torch_threads)
    result = train_job(config, root, objective, progress=not in_worker, progress_lines=in_worker)
    return {**result, "pid": os.getpid()}


@task(**retry_policy(), name="compose", task_run_name="compose w={weights} {method}")
def compose_task(
    weights: list[float],
    models: list[str] | None = None,
    method: str = DEFAULT_METHOD,
    num_images: int | None = None,
    seed: int | None = None,
    config_path: str | None = None,
    home: str | None = None,
    prompts: list[str] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    from flows.jobs import compose_job

    config, root = _context(config_path, home, overrides)
    return compose_job(
        config, root, weights, specs=models, method=method, num_images=num_images, seed=seed, prompts=prompts
    )


@task(**retry_policy(), name="sweep")
def sweep_task(
    methods: list[str] | None = None,
    grid: int | None = None,
    num_images: int | None = None,
    models: list[str] | None = None,
    config_path: str | None = None,
    home: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    from flows.jobs import sweep_job

    config, root = _context(config_path, home, overrides)
    return sweep_job(config, root, specs=models, methods=methods, grid=grid, num_images=num_images)


# ----------------------------------------------------------------------------------------------------- flows


def _run_name(template: str):
    """A flow-run name from the run's parameters (``None`` ones read "default"), instead of Prefect's random
    one: ``_run_name("compose w={weights} {method}")``."""

    def name() -> str:
        from prefect.runtime import flow_run

        values = {}
        for key, value in flow_run.parameters.items():
            if value is None:
                value = "default"
            elif isinstance(value, list | tuple):
                value = ",".join(str(v) for v in value)
            values[key] = value
        return template.format(**values)

    return name


@flow(name="pretrain-reference", log_prints=True, flow_run_name="pretrain reference")
def pretrain_reference(
    config_path: str | None = None, home: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Build (or reuse) the reference model."""
    return pretrain_task(config_path=config_path, home=home, overrides=overrides)


@flow(name="train-base-model", log_prints=True, flow_run_name=_run_name("train {objective}"))
def train_base_model(
    objective: str,
    config_path: str | None = None,
    home: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Train, log and register the base model for one objective."""
    result = train_task(objective, config_path=config_path, home=home, overrides=overrides)
    _publish_training([result], home)
    return result


def _publish_training(results: list[dict], home: str | None = None) -> None:
    rows = [
        {
            "objective": r["objective"],
            "reward before": round(r["reward_before"], 4),
            "reward after": round(r["reward_after"], 4),
            "rise (SE)": round(r["rise_in_se"], 1),
            "KL/step": round(r["kl"], 4),
            "seconds": round(r["seconds"], 1),
            "version": (r.get("registered") or {}).get("version"),
            "champion": (r.get("registered") or {}).get("champion"),
        }
        for r in results
    ]
    _publish("base-models", rows, "Base models trained and registered")
    _publish_version_links(results, home)


def _publish_version_links(results: list[dict], home: str | None) -> None:
    """With a tracking server, a markdown artifact linking each registered version's page in its UI."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from flows.tracking import is_remote, tracking_uri
    from flows.ui import model_version_url

    uri = tracking_uri(_home(home))
    registered = [r["registered"] for r in results if r.get("registered")]
    if FlowRunContext.get() is None or not is_remote(uri) or not registered:
        return
    lines = [
        f"- [{r['name']} v{r['version']}]({model_version_url(uri, r['name'], r['version'])})"
        + (" @champion" if r.get("champion") else "")
        for r in registered
    ]
    create_markdown_artifact(
        markdown="\n".join(lines), key="base-models-registry", description="Registered versions in MLflow"
    )


# Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in each worker it spawns (and in its own process), so glibc
# hands freed memory back to the OS at once; torch's training then spends much of its time faulting pages
# back in (docs/operations.md). The local cluster leaves glibc's default; a value the user set still wins.
LOCAL_WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@flow(name="fan-out-training", flow_run_name=_run_name("train {objectives} in parallel"))
def _fan_out(
    objectives: list[str],
    config_path: str | None,
    home: str | None,
    torch_threads: int,
    overrides: list[str] | None = None,
) -> list[dict]:
    futures = [
        train_task.submit(
            objective, config_path=config_path, home=home, torch_threads=torch_threads, overrides=overrides
        )
        for objective in objectives
    ]
    return [future.result() for future in futures]


@flow(
    name="train-base-models",
    log_prints=True,
    flow_run_name=_run_name("train base models: {objectives} ({runner})"),
)
def train_base_models(
    objectives: list[str] | None = None,
    runner: Runner = "auto",
    config_path: str | None = None,
    home: str | None = None,
    dask_address: str | None = None,
    dask_workers: PositiveInt = 2,
    overrides: list[str] | None = None,
) -> dict[str, dict]:
    """Train a base model per objective (default: the config's). ``runner="dask"`` fans out over a local Dask
    cluster of ``dask_workers`` single-threaded workers, or over the scheduler at ``dask_address``;
    ``"auto"`` fans out over one worker per model still to train when the CPU has the idle cores for it
    (:func:`flows.jobs.parallel_workers`), else trains one after the other."""
    config, root = _context(config_path, home, overrides)
    objectives = objectives or config.objective_names
    torch_threads = 1
    if runner == "auto":
        runner, dask_workers, torch_threads = _auto_runner(config, root, objectives)
    if runner == "sequential":
        results = [
            train_task(objective, config_path=config_path, home=str(root), overrides=overrides)
            for objective in objectives
        ]
    else:
        import dask
        from prefect_dask import DaskTaskRunner

        task_runner = (
            DaskTaskRunner(address=dask_address)
            if dask_address
            else DaskTaskRunner(
                cluster_kwargs={
                    "n_workers": dask_workers,
                    "threads_per_worker": 1,
                    "processes": True,
                    "dashboard_address": None,
                }
            )
        )
        with dask.config.set(LOCAL_WORKER_ENVIRON), _environment_kept(THREAD_VARIABLES), _cluster_quiet():
            results = _fan_out.with_options(task_runner=task_runner)(
                objectives,
                config_path=config_path,
                home=str(root),
                torch_threads=torch_threads,
                overrides=overrides,
            )
    _publish_training(results, str(root))
    return {r["objective"]: r for r in results}


def _auto_runner(config, root: Path, objectives: list[str]) -> tuple[Runner, int, int]:
    """``(runner, workers, torch threads per worker)`` for ``runner="auto"``; said in one line if parallel."""
    from flows.jobs import parallel_workers
    from training.base_model import untrained
    from training.device import free_cpus, resolve_device

    pending = untrained(config, objectives, root)
    idle = free_cpus()
    workers = parallel_workers(len(pending), idle, resolve_device(config.runtime.device).type)
    if not workers:
        return "sequential", 0, 0
    threads = idle // workers
    print(
        f"training {', '.join(pending)} in parallel: {workers} Dask worker processes with {threads} torch "
        f"thread{'s' if threads > 1 else ''} each ({idle} idle CPUs; `--runner sequential` trains one after "
        "the other)"
    )
    return "dask", workers, threads


@contextmanager
def _cluster_quiet():
    """The local cluster's INFO lines (scheduler, nanny, connections: about 30 a run) off the terminal while
    it runs; its warnings and errors stay."""
    import logging

    loggers = [logging.getLogger(name) for name in ("distributed", "prefect.task_runner.dask")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Thread counts that Dask's nanny sets to 1 in this process's environment for its workers
(``distributed.nanny.pre-spawn-environ``): kept from leaking into the stages after the fan-out, whose torch
threads ``configure_threads`` reads from ``OMP_NUM_THREADS``."""


@contextmanager
def _environment_kept(names: tuple[str, ...]):
    """Restore the environment variables ``names`` on exit to what they were on entry (set or unset)."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@flow(name="compose", log_prints=True, flow_run_name=_run_name("compose w={weights} {method}"))
def compose(
    weights: list[float],
    models: list[str] | None = None,
    method: MethodName = DEFAULT_METHOD,
    num_images: PositiveInt | None = None,
    seed: int | None = None,
    config_path: str | None = None,
    home: str | None = None,
    prompts: list[str] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """On-demand composition of registered base models (``NAME[@ALIAS]``; default: the objectives'
    champions), the images cycling through ``prompts`` (default: the config's evaluation prompts)."""
    result = compose_task(
        weights,
        models=models,
        method=method,
        num_images=num_images,
        seed=seed,
        config_path=config_path,
        home=home,
        prompts=prompts,
        overrides=overrides,
    )
    rows = [
        {"objective": k, "mean reward": round(v, 4), "SE": round(result["reward_se"][k], 4)}
        for k, v in result["rewards"].items()
    ]
    _publish(
        "composition",
        rows,
        f"{method} at w={weights}, {result['nfe']:g} NFE/image",
        link=str(Path(result["image_dir"]) / "grid.png"),
        home=_home(home),
        run_id=result.get("mlflow_run_id"),
        artifact="images/grid.png",
    )
    return result


@flow(name="sweep", log_prints=True, flow_run_name=_run_name("sweep methods={methods} grid={grid}"))
def sweep(
    methods: list[MethodName] | None = None,
    grid: Annotated[int, Field(ge=2)] | None = None,
    num_images: Annotated[int, Field(ge=2)] | None = None,
    models: list[str] | None = None,
    config_path: str | None = None,
    home: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Every method over the weight grid; publishes the hypervolume table and the Pareto plot."""
    result = sweep_task(
        methods=methods,
        grid=grid,
        num_images=num_images,
        models=models,
        config_path=config_path,
        home=home,
        overrides=overrides,
    )
    _publish(
        "sweep",
        [
            {"method": m, "hypervolume": round(v["hypervolume"], 5), "max NFE/image": v["max_nfe"]}
            for m, v in result["methods"].items()
        ],
        "Hypervolume per method (reference point: the reference model)",
        link=result["plot"],
        home=_home(home),
        run_id=result.get("mlflow_run_id"),
        artifact="pareto.png",
    )
    return result


@flow(name="msdda-pipeline", log_prints=True, flow_run_name=_run_name("msdda run ({runner})"))
def pipeline(
    config_path: str | None = None,
    home: str | None = None,
    runner: Runner = "auto",
    overrides: list[str] | None = None,
) -> dict:
    """Pretrain (cached), train and register the base models (cached), then sweep (cached)."""
    import time

    start = time.perf_counter()
    reference = pretrain_reference(config_path=config_path, home=home, overrides=overrides)
    models = train_base_models(runner=runner, config_path=config_path, home=home, overrides=overrides)
    registered = [f"{r['registered']['name']}/{r['registered']['version']}" for r in models.values()]
    result = sweep(models=registered, config_path=config_path, home=home, overrides=overrides)
    return {
        "reference": reference,
        "base_models": models,
        "sweep": result,
        "seconds": round(time.perf_counter() - start, 1),
    }


FLOWS = {
    f.name: f for f in (pretrain_reference, train_base_model, train_base_models, compose, sweep, pipeline)
}
"""Every flow by its Prefect name (the deployments look theirs up here: ``flows.deploy``)."""
