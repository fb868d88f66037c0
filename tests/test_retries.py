"""Which task failures the Prefect tasks retry (an allow-list), and the one base class of user errors."""

import sqlite3
import urllib.error

import pytest

from configs.errors import MsddaError
from flows.pipeline import pretrain_task, train_task
from flows.retries import is_transient
from flows.retries import retry_condition as _transient


def _real_sqlite_lock(tmp_path) -> sqlite3.OperationalError:
    """The error SQLite itself raises when a second writer finds the database locked."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as info:
            other.execute("INSERT INTO t VALUES (1)")
    finally:
        other.close()
        holder.execute("ROLLBACK")
        holder.close()
    return info.value


def _user_errors():
    from configs import ConfigError
    from flows.cli import UsageError
    from flows.deploy import DeploymentError
    from training.rewards import RewardError
    from training.storage import ModelLoadError

    return [ConfigError, RewardError, ModelLoadError, DeploymentError, UsageError]


def test_user_errors_share_one_base_class_and_keep_their_second_one():
    config, reward, model_load, deployment, usage = _user_errors()
    for cls in (config, reward, model_load, deployment, usage):
        assert issubclass(cls, MsddaError), cls
    assert issubclass(model_load, RuntimeError)  # existing `except RuntimeError` clauses still catch it
    assert all(issubclass(cls, ValueError) for cls in (config, reward, deployment))


def test_user_errors_are_never_retried():
    from training.storage import ModelLoadError

    assert not is_transient(ModelLoadError("cannot load Stable Diffusion weights 'x'"))
    for cls in _user_errors():
        assert not is_transient(cls("bad input")), cls

    class Custom(MsddaError):
        pass

    assert not is_transient(Custom("anything"))
    # even when a transient error caused it: the user-facing error is the verdict
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as cause:
            raise Custom("registering failed: database is locked") from cause
    except Custom as exc:
        assert not is_transient(exc)


def test_locked_sqlite_is_retried(tmp_path):
    locked = _real_sqlite_lock(tmp_path)
    assert "database is locked" in str(locked)
    assert is_transient(locked)
    assert is_transient(sqlite3.OperationalError("database table is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: runs"))


def test_locked_database_through_sqlalchemy_and_mlflow_is_retried():
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    locked = sqlite3.OperationalError("database is locked")
    raw = sqlalchemy.exc.OperationalError("INSERT INTO runs ...", {}, locked)
    assert is_transient(raw)
    try:  # as mlflow.store.db.utils wraps it
        try:
            raise raw
        except sqlalchemy.exc.OperationalError as exc:
            raise MlflowException(message=exc) from exc
    except MlflowException as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(MlflowException("Registered Model with name=x not found"))
    disk = sqlite3.OperationalError("disk I/O error")
    assert not is_transient(sqlalchemy.exc.OperationalError("SELECT", {}, disk))


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        TimeoutError("timed out"),
        urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
        urllib.error.HTTPError("http://x", 503, "Service Unavailable", {}, None),
    ],
    ids=repr,
)
def test_connection_errors_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error: an illegal memory access"),
        ValueError("bad shape"),
        TypeError("unexpected argument"),
        KeyError("missing"),
        FileNotFoundError(2, "No such file or directory"),
        PermissionError(13, "Permission denied"),
        MemoryError(),
        AssertionError("invariant"),
        urllib.error.HTTPError("http://x", 404, "Not Found", {}, None),
    ],
    ids=repr,
)
def test_everything_else_fails_at_once(exc):
    assert not is_transient(exc)


def test_a_transient_cause_is_found_through_raise_from():
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise RuntimeError("MLflow request failed") from cause
    except RuntimeError as exc:
        assert is_transient(exc)


def test_lost_dask_worker_is_retried():
    distributed = pytest.importorskip("distributed")
    from distributed.comm.core import CommClosedError

    assert is_transient(distributed.KilledWorker("train-abc", "tcp://127.0.0.1:1234", "worker died"))
    assert is_transient(CommClosedError("in <TCP (closed)>: Stream is closed"))


def test_the_tasks_use_the_predicate_on_prefect_states():
    from prefect.states import Completed, Failed

    from training.storage import ModelLoadError

    assert pretrain_task.retries == 2 and train_task.retries == 1
    assert pretrain_task.retry_condition_fn is _transient and train_task.retry_condition_fn is _transient
    assert _transient(None, None, Failed(data=ConnectionRefusedError(111, "Connection refused")))
    assert not _transient(None, None, Failed(data=ModelLoadError("missing weights")))
    assert not _transient(None, None, Failed(data=RuntimeError("boom")))
    assert not _transient(None, None, Completed(data=1))


# ------------------------------------------------------------- the compose and sweep flows' tasks, in Prefect


def test_compose_and_sweep_tasks_take_the_training_retry_policy():
    from flows.pipeline import compose_task, sweep_task
    from flows.retries import RETRY_DELAY_SECONDS

    for task in (compose_task, sweep_task):
        assert task.retries == train_task.retries == 1
        assert task.retry_delay_seconds == train_task.retry_delay_seconds == RETRY_DELAY_SECONDS
        assert task.retry_condition_fn is train_task.retry_condition_fn is _transient


def _failing_then(result: dict, first_error: BaseException):
    """A job that fails with ``first_error`` on its first call and returns ``result`` after; its calls."""
    calls = []

    def job(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise first_error
        return result

    return job, calls


COMPOSED = {
    "rewards": {"ink_economy": 0.5},
    "reward_se": {"ink_economy": 0.01},
    "nfe": 20.0,
    "image_dir": "/nonexistent/compose",
    "mlflow_run_id": None,
}


def test_the_compose_flow_retries_a_transient_failure_of_its_task(prefect_harness, monkeypatch, tmp_path):
    """A real (ephemeral) Prefect run of the flow ``compose``: a lost connection in its work is tried again
    and the flow returns the job's result unchanged; an :class:`MsddaError` fails the flow at the first try.
    Only the job is replaced (and the task's 10 s delay set to 0); Prefect runs as it does for a user."""
    from composition.engine import CompositionError
    from flows import jobs, pipeline

    monkeypatch.setattr(pipeline, "compose_task", pipeline.compose_task.with_options(retry_delay_seconds=0))
    job, calls = _failing_then(COMPOSED, ConnectionRefusedError(111, "Connection refused"))
    monkeypatch.setattr(jobs, "compose_job", job)
    assert pipeline.compose([0.5, 0.5], home=str(tmp_path), seed=3) == COMPOSED
    assert len(calls) == 2 and calls[0] == calls[1] and calls[0]["seed"] == 3

    job, calls = _failing_then(COMPOSED, CompositionError("unknown method"))
    monkeypatch.setattr(jobs, "compose_job", job)
    with pytest.raises(CompositionError, match="unknown method"):
        pipeline.compose([0.5, 0.5], home=str(tmp_path))
    assert len(calls) == 1


def test_the_sweep_flow_retries_a_locked_store_and_not_an_msdda_error(prefect_harness, monkeypatch, tmp_path):
    from flows import jobs, pipeline

    swept = {"methods": {"msdda": {"hypervolume": 0.1, "max_nfe": 20.0}}, "plot": "/nonexistent/pareto.png"}
    monkeypatch.setattr(pipeline, "sweep_task", pipeline.sweep_task.with_options(retry_delay_seconds=0))
    job, calls = _failing_then(swept, sqlite3.OperationalError("database is locked"))
    monkeypatch.setattr(jobs, "sweep_job", job)
    assert pipeline.sweep(grid=3, home=str(tmp_path)) == swept
    assert len(calls) == 2 and calls[1]["grid"] == 3

    job, calls = _failing_then(swept, MsddaError("no base models"))
    monkeypatch.setattr(jobs, "sweep_job", job)
    with pytest.raises(MsddaError, match="no base models"):
        pipeline.sweep(home=str(tmp_path))
    assert len(calls) == 1
