"""MLflow tracking: the default store is SQLite plus an artifact folder under ``$MSDDA_HOME``;
``MLFLOW_TRACKING_URI`` (e.g. an ``mlflow server``) overrides it.

Every MLflow client the project makes comes from :func:`mlflow_client`, which first applies
:data:`MLFLOW_DEFAULTS` (each unless the user set it): a tracking server that goes away fails a request in
seconds rather than minutes, MLflow prints no "View run" links on stdout (a command's ``--json`` output is one
JSON object) and no INFO lines (database migrations) on the terminal. Failures of the store are one line
(:class:`TrackingError`, see :func:`store_errors`): a corrupt SQLite file, or a store path that is no file (a
directory) or may not be read, is named at once and left as it is; a server that stopped answering is named by
its URL.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from configs.errors import MsddaError, first_line
from flows.failures import causes, console_without_tracebacks, is_corrupt_sqlite

EXPERIMENT = "msdda"
HOST_TAG = "msdda.host"
PID_TAG = "msdda.pid"
STALE_TAG = "msdda.stale"

MLFLOW_DEFAULTS = {
    # A request to a server that went away: 3 retries 0, 2 and 4 s apart (plus jitter), not 7 retries over
    # about 4 minutes; a server that accepts but does not answer: 30 s per try, not 120.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # stdout belongs to the command (--json: one object)
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # no INFO lines (store creation, migrations) on the terminal
}
"""MLflow settings the project applies unless the environment sets them (:func:`configure_mlflow`)."""


class TrackingError(MsddaError, RuntimeError):
    """The MLflow store cannot be used: a corrupt SQLite file, a tracking server that stopped answering
    (one line, naming the file or the server)."""


def configure_mlflow() -> None:
    """Apply :data:`MLFLOW_DEFAULTS` (MLflow reads them per request) and set MLflow's and alembic's log
    levels to ``MLFLOW_LOGGING_LEVEL`` (MLflow applies it only when first imported; alembic at least
    WARNING). MLflow's complaint about a failed background write is dropped: :func:`mlflow_run` raises it.
    A record MLflow logs with a traceback is one line on the terminal
    (:func:`flows.failures.console_without_tracebacks`)."""
    for name, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import mlflow  # noqa: F401 - configures MLflow's loggers on first import

    level = logging.getLevelName(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    level = level if isinstance(level, int) else logging.WARNING
    logging.getLogger("mlflow").setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(logging.CRITICAL)
    console_without_tracebacks()  # MLflow logs a failed SQLAlchemy call with ~90 lines of traceback


def mlflow_client(home: Path):
    """An ``MlflowClient`` on ``home``'s tracking (and registry) URI, MLflow configured first."""
    configure_mlflow()
    from mlflow import MlflowClient

    uri = tracking_uri(home)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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
    run = mlflow_client(home).get_run(run_id)
    return run_url(uri, run.info.experiment_id, run_id, artifact)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def local_store(home: Path) -> Path | None:
    """The SQLite file of ``home``'s store, ``None`` for a tracking server or another database."""
    return sqlite_path(tracking_uri(home))


def _corrupt_store(database: Path, reason: str) -> TrackingError:
    return TrackingError(
        f"the MLflow store {database} is corrupt ({reason}): move it aside (mv {database} "
        f"{database}.corrupt) and run the command again; a new, empty store is then created"
    )


def _unopenable(database: Path) -> TrackingError | None:
    """The one-line error for a store path that SQLite cannot open as a database file: a directory (or a
    pipe, a device) or a file this process may not read and write. MLflow would retry it for minutes."""
    if database.is_dir():
        kind = "a directory"
    elif not database.is_file():
        kind = "not a regular file"
    elif not os.access(database, os.R_OK | os.W_OK):
        return TrackingError(
            f"the MLflow store {database} cannot be read and written by this user (permission denied): "
            f"fix its permissions (chmod u+rw {database}), or set MSDDA_HOME to another folder"
        )
    else:
        return None
    return TrackingError(
        f"the MLflow store {database} is {kind}, not a SQLite file: move it aside (mv {database} "
        f"{database}.aside) and run the command again (a new, empty store is then created), or set "
        "MSDDA_HOME to another folder"
    )


def check_store(home: Path) -> None:
    """Raise :class:`TrackingError` (one line naming the file) if ``home``'s SQLite store exists but cannot
    be used: not a file (a directory), not readable and writable, or not an intact database (garbage, empty,
    or truncated: SQLite's ``quick_check``, read-only). Nothing is changed; a store that does not exist yet,
    or another kind of store, passes."""
    database = local_store(home)
    if database is None or not database.exists():
        return
    error = _unopenable(database)
    if error is not None:
        raise error
    if _identity(database) in _FOUND_INTACT:
        return
    with store_lock(home):  # not while another command creates the store (an empty file, for a moment)
        if database.stat().st_size == 0:
            raise _corrupt_store(database, "the file is empty")
        try:
            with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=30)) as connection:
                verdict = connection.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if not is_corrupt_sqlite(exc):
                return  # locked, or unreadable: MLflow reports it
            verdict = str(exc)
    if verdict != "ok":
        raise _corrupt_store(database, f"integrity check: {first_line(verdict)}")
    _FOUND_INTACT.add(_identity(database))


_FOUND_INTACT: set[tuple[str, int]] = set()
"""Stores :func:`check_store` found intact in this process: the whole-file check runs once per store and
process (a store damaged later fails MLflow's own calls, which :func:`store_errors` reports)."""


def _identity(database: Path) -> tuple[str, int]:
    """A store file's path and inode: a file moved aside and replaced is checked again."""
    return str(database.resolve()), database.stat().st_ino


def _names_the_server(exc: BaseException, uri: str) -> bool:
    """Whether a failed request in ``exc`` went to the tracking server at ``uri`` (its request's URL, or its
    text, names the server's host and port, or an MLflow API path), not to another host (a model hub)."""
    from urllib.parse import urlsplit

    server = urlsplit(uri)
    port = server.port or (443 if server.scheme == "https" else 80)
    request = getattr(exc, "request", None)
    text = f"{getattr(request, 'url', '') or ''} {exc}"
    return (
        f"{server.hostname}:{port}" in text
        or f"host='{server.hostname}', port={port}" in text
        or "/api/2.0/mlflow/" in text
        or "API request to " in text
    )


def _connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a request that got no answer (refused, reset, timed out, retries spent): the error
    itself, or MLflow's report of it (also when a background write failed, which keeps only the text)."""
    import requests

    transport = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)
    if isinstance(exc, (*transport, requests.exceptions.RetryError)):
        return True
    text = str(exc)
    return "API request to " in text and ("failed with exception" in text or "timeout exception" in text)


def store_failure(home: Path, what: str, exc: BaseException) -> TrackingError | None:
    """The one-line error for ``exc``, raised while ``what``, if it says the store cannot be used: the
    tracking server stopped answering, or the SQLite file is corrupt; else ``None``."""
    uri = tracking_uri(home)
    for cause in causes(exc):
        if is_remote(uri) and _connection_failure(cause) and _names_the_server(cause, uri):
            return TrackingError(
                f"the MLflow tracking server at {uri} stopped answering while {what}: check that it runs, "
                "or unset MLFLOW_TRACKING_URI to use the local store"
            )
        database = local_store(home)
        if database is not None and isinstance(cause, sqlite3.DatabaseError) and is_corrupt_sqlite(cause):
            return _corrupt_store(database, first_line(cause))
    return None


@contextmanager
def store_errors(home: Path, what: str) -> Iterator[None]:
    """Turn the failures of :func:`store_failure` raised inside into its one-line :class:`TrackingError`."""
    try:
        yield
    except MsddaError:
        raise
    except Exception as exc:
        error = store_failure(home, what, exc)
        if error is None:
            raise
        raise error from exc


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


def process_tags() -> dict[str, str]:
    """Tags naming the process that starts a run (host and pid), so that a later one can tell whether that
    process is gone (:func:`fail_stale_runs`)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def fail_stale_runs(client, experiment_id: str) -> list[str]:
    """Mark ``FAILED`` the runs of the experiment still ``RUNNING`` although the process that started them, on
    this host, is gone (killed with -9, the machine lost power); returns their ids.

    A run is judged by its :func:`process_tags`: one from another host, or without them, is left alone (its
    process may be alive), and so is one whose pid is alive (a concurrent command).
    """
    from mlflow.entities import RunStatus

    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    stale = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            reason = f"process {pid} on {host} ended without closing the run"
            client.set_tag(run.info.run_id, STALE_TAG, reason)
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            stale.append(run.info.run_id)
    return stale


@contextmanager
def mlflow_run(home: Path, run_name: str, params: dict | None = None, tags: dict | None = None):
    """An active MLflow run in the ``msdda`` experiment; yields ``(run, log_iteration)``.

    Runs of the experiment left ``RUNNING`` by processes that are gone are marked failed first
    (:func:`fail_stale_runs`). ``log_iteration`` writes in the background, at most one iteration behind: a
    write that failed stops the run at the next iteration. The store's failures are one line
    (:func:`store_errors`).
    """
    import mlflow

    with store_errors(home, f"logging the run {run_name!r}"):
        home.mkdir(parents=True, exist_ok=True)
        check_store(home)
        mlflow.set_tracking_uri(tracking_uri(home))
        with store_lock(home):  # a new SQLite store is created (migrated) by the first client
            client = mlflow_client(home)
            experiment_id = ensure_experiment(client, home)
        fail_stale_runs(client, experiment_id)
        mlflow.set_experiment(experiment_id=experiment_id)
        with mlflow.start_run(run_name=run_name, tags={**(tags or {}), **process_tags()}) as run:
            if params:
                mlflow.log_params(params)
            pending = []  # the previous iteration's background write

            def log_iteration(metrics) -> None:
                if pending:
                    pending.pop().wait()  # raises if it failed
                operation = mlflow.log_metrics(
                    {
                        "reward_mean": metrics.reward_mean,
                        "reward_std": metrics.reward_std,
                        "kl": metrics.kl,
                        "loss": metrics.loss,
                        "unet_evaluations": metrics.unet_evaluations,
                        "seconds": metrics.seconds,
                        "ess_share": metrics.ess_share,
                        "reward_spread": metrics.reward_spread,
                        **{
                            name: value  # only at the iterations the kernel check ran
                            for name, value in (
                                ("kernel_error", metrics.kernel_error),
                                ("kernel_cosine", metrics.kernel_cosine),
                            )
                            if math.isfinite(value)
                        },
                    },
                    step=metrics.iteration,
                    synchronous=False,  # a background thread writes; training does not wait on the store
                )
                pending.append(operation)

            try:
                yield run, log_iteration
                if pending:
                    pending.pop().wait()  # the last iteration's write fails the run too
            finally:
                mlflow.flush_async_logging()
