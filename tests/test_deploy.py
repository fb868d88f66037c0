"""`msdda deploy` against real services: a `prefect server start` subprocess, the deployments served by
`msdda deploy` (or put on a process work pool and run by `prefect worker start`), scheduled training runs on
the server, an on-demand composition triggered with `run_deployment` and its MLflow run in a SQLite store.
Everything lives in tmp folders; every process started here is stopped here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.helpers import MSDDA, REPO, free_port, subprocess_env

PREFECT = [sys.executable, "-m", "prefect"]


def _base_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(
        without_prefixes=("PREFECT_", "MLFLOW_"),
        PREFECT_HOME=prefect_home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        OMP_NUM_THREADS="1",
        **extra,
    )


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A background process in its own session, its output (both streams) in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 60) -> int:
    """Signal ``process``'s own process group (the flow-run subprocesses it spawned included) and reap it."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    try:  # leftovers of the group (a flow run still shutting down)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.returncode


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _wait_for(
    predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}\n{_tail(log) if log else ''}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_tail(log) if log else ''}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server (SQLite in tmp, scheduler every second, no UI) on a free local port."""
    root = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    env = _base_env(
        root / "home",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    log = root / "server.log"
    server = _start(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"], env, root, log
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _wait_for(healthy, 90, "the Prefect server", server, log)
        yield {"url": url, "log": log}
    finally:
        _stop(server)


@contextmanager
def _client(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def _flow_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def _run_compose(url: str, weights: list[float], timeout: float = 240, **parameters):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return run_deployment(
            "compose/on-demand",
            parameters={"weights": weights, "num_images": 4, "seed": 3, **parameters},
            timeout=timeout,
            poll_interval=1,
        )


def _compose_mlflow_runs(uri: str, weights: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("msdda")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"params.weights = '{weights}' and tags.`msdda.job` = 'compose'",
    )


@pytest.fixture
def registry(tiny_registry):
    """The tiny base models as champions in a fresh MLflow SQLite store (reference: the session's tiny
    home)."""
    assert [v["version"] for v in tiny_registry["versions"]] == [1, 1]
    return tiny_registry


def _env(prefect_server, registry, tmp_path: Path, **extra: str) -> dict[str, str]:
    return _base_env(
        tmp_path / "prefect_client",
        PREFECT_API_URL=prefect_server["url"],
        MSDDA_HOME=str(registry["home"]),
        MLFLOW_TRACKING_URI=registry["uri"],
        **extra,
    )


def _check_scheduled_training(
    client, config: Path, home: Path, cron: str = "0 3 * * *", overrides: list[str] = ()
) -> None:
    training = client.read_deployment_by_name("train-base-models/scheduled-training")
    assert training.paused is False
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in training.schedules] == [
        (cron, "UTC", True)
    ]
    assert training.parameters == {
        "config_path": str(config.resolve()),
        "home": str(home.resolve()),
        "overrides": list(overrides),
    }

    def upcoming():
        now = datetime.now(timezone.utc)
        return [
            r
            for r in _flow_runs(client, training.id)
            if r.state_type.value == "SCHEDULED" and r.expected_start_time > now
        ]

    runs = _wait_for(upcoming, 60, "the scheduler to create the training runs")
    assert all(r.expected_start_time.hour == 3 and r.expected_start_time.minute == 0 for r in runs)


def _check_composition(url: str, registry: dict, weights: list[float], log: Path, **parameters):
    text = ",".join(f"{w:g}" for w in weights)
    assert not _compose_mlflow_runs(registry["uri"], text)
    flow_run = _run_compose(url, weights, **parameters)
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"composition run ended {flow_run.state}\n{_tail(log)}"
    )
    (run,) = _compose_mlflow_runs(registry["uri"], text)
    assert run.data.params["method"] == "msdda" and run.data.params["num_images"] == "4"
    assert run.data.params["models"] == "msdda-digit_alignment/1,msdda-ink_economy/1"
    assert (
        run.data.metrics["nfe"] == 2 * 4
        and {"reward_digit_alignment", "reward_ink_economy"} <= run.data.metrics.keys()
    )
    if "prompts" in parameters:
        assert json.loads(run.data.params["prompts"]) == parameters["prompts"]
    return run


@pytest.mark.slow  # end to end, in the slow suite (the fast suite's 10-minute budget)
def test_serve_schedules_training_and_composes_on_demand(prefect_server, registry, tmp_path):
    """`msdda deploy` (serve mode) registers both deployments; the server schedules training at 03:00 UTC; a
    triggered composition runs in the served process with its prompts and the deployment's overrides and
    logs its MLflow run; Ctrl-C (SIGINT) stops serving."""
    env = _env(prefect_server, registry, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log, out = tmp_path / "serve.log", tmp_path / "serve.out"
    overrides = ["--set", "composition.seed=5", "--device", "cpu"]
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        serve = subprocess.Popen(
            [*MSDDA, "deploy", "--config", str(registry["config"]), *overrides, "--json"],
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        ready = _wait_for(lambda: out.read_text().strip(), 120, "`msdda deploy` to report", serve, log)
        payload = json.loads(ready.splitlines()[0])
        assert payload["serving"] is True and payload["work_pool"] is None
        assert [d["name"] for d in payload["deployments"]] == [
            "train-base-models/scheduled-training",
            "compose/on-demand",
        ]
        assert "serving; Ctrl-C to stop" in log.read_text()
        with _client(prefect_server["url"]) as client:
            ids = {d["name"]: d["id"] for d in payload["deployments"]}
            for name, deployment_id in ids.items():
                deployment = _deployment(client, name)
                assert deployment is not None and str(deployment.id) == deployment_id
                assert deployment.work_pool_name is None
            assert not _deployment(client, "compose/on-demand").schedules
            applied = ["composition.seed=5", "runtime.device=cpu"]
            _check_scheduled_training(client, registry["config"], registry["home"], overrides=applied)
            assert _deployment(client, "compose/on-demand").parameters["overrides"] == applied

        prompts = ["a handwritten digit seven", "handwritten two"]
        run = _check_composition(prefect_server["url"], registry, [0.3, 0.7], log, prompts=prompts, seed=None)
        assert run.data.params["seed"] == "5", "the deployment's --set reached the run"
    finally:
        code = _stop(serve, signal.SIGINT)
    assert code == 0, _tail(log)
    with _client(prefect_server["url"]) as client:  # serving stopped: its schedules are paused
        training = client.read_deployment_by_name("train-base-models/scheduled-training")
        assert training.paused is True


@pytest.mark.slow
def test_process_work_pool_round_trip(prefect_server, registry, tmp_path):
    """`msdda deploy --pool` creates the process pool and both deployments and exits; a `prefect worker` on
    that pool runs a triggered composition from the source folder."""
    env = _env(prefect_server, registry, tmp_path)
    pool = "msdda-test-pool"
    result = subprocess.run(
        [
            *MSDDA,
            "deploy",
            "--pool",
            pool,
            "--cron",
            "0 3 * * *",
            "--config",
            str(registry["config"]),
            "--json",
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["work_pool"] == pool and payload["serving"] is False
    assert [d["name"] for d in payload["deployments"]] == [
        "train-base-models/scheduled-training",
        "compose/on-demand",
    ]
    with _client(prefect_server["url"]) as client:
        assert client.read_work_pool(pool).type == "process"
        for row in payload["deployments"]:
            deployment = client.read_deployment(row["id"])
            assert deployment.work_pool_name == pool
            assert deployment.entrypoint in (
                "flows/pipeline.py:train_base_models",
                "flows/pipeline.py:compose",
            )
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
            ]
        _check_scheduled_training(client, registry["config"], registry["home"])

    log = tmp_path / "worker.log"
    worker = _start(
        [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
        {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        tmp_path,
        log,
    )
    try:
        _check_composition(prefect_server["url"], registry, [0.6, 0.4], log)
    finally:
        _stop(worker, signal.SIGINT)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "run `prefect server start` and set PREFECT_API_URL"),
        (["--pool", "p"], {}, "ephemeral mode cannot hold deployments"),
        ([], {"PREFECT_API_URL": "http://127.0.0.1:PORT/api"}, "is unreachable"),
        (["--cron", "61 * * * *"], {}, "invalid cron schedule '61 * * * *'"),
    ],
)
def test_deploy_bad_setup_is_one_line_exit_2(tmp_path, tiny_config_file, args, env, message):
    env = {k: v.replace("PORT", str(free_port())) for k, v in env.items()}
    result = subprocess.run(
        [*MSDDA, "deploy", "--config", str(tiny_config_file), *args],
        check=False,
        cwd=tmp_path,
        env=_base_env(tmp_path / "prefect", MSDDA_HOME=str(tmp_path / "home"), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "home").exists()
