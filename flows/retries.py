"""Which failed Prefect task runs are tried again, and how: the retry policy of every task in
``flows.pipeline``.

A failed task is retried only when its error is on an explicit allow-list (:func:`is_transient`): a locked
SQLite database, a lost connection or a timeout, a lost Dask worker. Every other error fails at once, and so
does every :class:`~configs.errors.MsddaError` (bad input or a broken artefact), whatever caused it.

How a command that fails *reports* it (exit code, one line, log file) is :mod:`flows.failures`'s job; this
module only decides whether a second try may pass.
"""

from __future__ import annotations

import sqlite3
import urllib.error
from typing import Any

from configs.errors import MsddaError
from flows.failures import is_sqlite_locked, loaded_classes

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
"""Errors that may pass on a second try whatever their message: a refused, reset or broken connection
(``ConnectionError`` covers ``ConnectionRefusedError``, ``ConnectionResetError``, ``BrokenPipeError``...)
and a timeout (``socket.timeout`` is ``TimeoutError``). :func:`is_transient` holds the rest of the list."""


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, urllib.error.URLError):  # no route, DNS failure...; an HTTP error only if server-side
        return not isinstance(exc, urllib.error.HTTPError) or exc.code == 429 or exc.code >= 500
    locked = (
        sqlite3.OperationalError,
        *loaded_classes("sqlalchemy.exc", "OperationalError"),
        *loaded_classes("mlflow.exceptions", "MlflowException"),
    )
    if isinstance(exc, locked):
        return is_sqlite_locked(exc)
    connection = (
        *loaded_classes("requests.exceptions", "ConnectionError", "Timeout"),
        *loaded_classes("httpx", "TransportError"),
        # a Dask worker died (KilledWorker) or its connection closed under a task (CommClosedError)
        *loaded_classes("distributed", "KilledWorker"),
        *loaded_classes("distributed.comm.core", "CommClosedError"),
    )
    return isinstance(exc, connection)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed task may pass on a second try: an explicit allow-list (a locked SQLite database, a
    lost connection or a timeout, a lost Dask worker), looked for in ``exc`` and the exceptions it was raised
    ``from``.

    Everything else fails at once, and so does every :class:`~configs.errors.MsddaError` (bad input or a
    broken artefact: config, reward, model loading, registry, composition) whatever caused it.
    """
    if isinstance(exc, MsddaError):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if _transient_one(current):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def retry_condition(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry the failed task only if its exception :func:`is_transient`."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified by the allow-list
        return is_transient(exc)
    return False


RETRY_DELAY_SECONDS = 10
"""Seconds between a failed task run and its next try."""


def retry_policy(retries: int = 1) -> dict[str, Any]:
    """The retry options of a Prefect task (``@task(**retry_policy(), name=...)``): ``retries`` more tries
    after :data:`RETRY_DELAY_SECONDS`, only for an error that :func:`is_transient`. Every task of
    ``flows.pipeline`` takes them: one more try (training, composing, sweeping), two for the reference's
    pretraining."""
    return {
        "retries": retries,
        "retry_delay_seconds": RETRY_DELAY_SECONDS,
        "retry_condition_fn": retry_condition,
    }
