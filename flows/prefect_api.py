"""The Prefect API a command's flows talk to, made sure of before the command does any expensive work.

With ``PREFECT_API_URL`` set (environment or Prefect profile), :func:`ensure_api` checks that the server
answers: one health check with a short timeout and no retries, so that a server that is down costs seconds,
not Prefect's retries or minutes of training.

Without it, Prefect runs flows against a temporary ("ephemeral") server: a uvicorn subprocess that first
creates and migrates its SQLite database in ``$PREFECT_HOME``, then answers ``/health``. Prefect waits
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` for it (default 20 s, counting only its own sleeps),
which a fresh ``PREFECT_HOME`` on a busy 2-core machine exceeds. So :func:`ensure_api` starts that server
itself, with :data:`STARTUP_TIMEOUT_SECONDS` unless the user set the setting, tries once more with a fresh
server if the first does not start, and then gives up with a one-line :class:`PrefectApiError` naming the
cause and the remedy. The server it starts is Prefect's own process-wide one (``SubprocessASGIServer()``, a
singleton), which every Prefect client of this process then reuses; it stops when the process exits.
"""

from __future__ import annotations

import time

from configs.errors import MsddaError, first_line

STARTUP_TIMEOUT_SECONDS = 180
"""How long the temporary server may take to start unless ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
is set (Prefect's default is 20 s): a fresh ``PREFECT_HOME`` took 49-77 s on 2 cores beside three CPU-bound
processes (``tests/test_prefect_api.py``, slow)."""
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
HEALTHCHECK_SECONDS = 5.0
"""How long a configured Prefect server (``PREFECT_API_URL``) may take to answer the health check."""
START_ATTEMPTS = 2
STARTED_LOGGER = "msdda"
"""Prefect's logger (``prefect.msdda``) that reports how long the temporary server took to start."""
SERVER_REMEDY = "start it (`prefect server start`) or point PREFECT_API_URL at one that runs"


class PrefectApiError(MsddaError):
    """The Prefect API cannot be reached or started: one line naming the cause and the remedy."""


def startup_timeout() -> int:
    """The temporary server's startup timeout in seconds: the user's setting (environment or profile) if
    there is one, else :data:`STARTUP_TIMEOUT_SECONDS`."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if STARTUP_TIMEOUT_SETTING in settings.to_environment_variables(exclude_unset=True):
        return settings.server.ephemeral.startup_timeout_seconds
    return STARTUP_TIMEOUT_SECONDS


def check_api(url: str, remedy: str = SERVER_REMEDY) -> str:
    """``url`` itself, once the Prefect server there answers its health check (one try, a
    :data:`HEALTHCHECK_SECONDS` timeout); else a :class:`PrefectApiError` ending in ``remedy``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}),
        get_client(httpx_settings={"timeout": HEALTHCHECK_SECONDS}, sync_client=True) as client,
    ):
        failure = client.api_healthcheck()
    if failure is not None:
        if "Timeout" in type(failure).__name__:
            reason = f"no answer within {HEALTHCHECK_SECONDS:g} s"
        else:
            reason = first_line(failure)
        raise PrefectApiError(f"Prefect server at {url} is unreachable: {reason}: {remedy}")
    return url


def _start_temporary_server(timeout: int) -> str:
    """Start Prefect's process-wide temporary server (a no-op if it runs) and return its API URL, logging how
    long it took; a server that did not start is stopped again, its process ended."""
    from prefect.logging import get_logger
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    start = time.perf_counter()
    try:
        server.start(timeout=timeout)
    except BaseException:
        server.stop()  # ends its process and forgets the instance: the next try starts a fresh one
        raise
    get_logger(STARTED_LOGGER).info(f"temporary server up in {time.perf_counter() - start:.1f} s")
    return server.api_url


def ensure_api() -> str:
    """The URL of a Prefect API that answers: the configured server's (``PREFECT_API_URL``, checked), or
    that of the temporary server, started now (see the module's docstring). Call it before any expensive
    work of a command that runs flows."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return check_api(
            url,
            remedy=f"{SERVER_REMEDY}, or unset PREFECT_API_URL to run flows on a temporary server",
        )
    timeout = startup_timeout()
    failure: Exception | None = None
    for _ in range(START_ATTEMPTS):
        try:
            return _start_temporary_server(timeout)
        except Exception as exc:  # noqa: BLE001 - whatever stops it, the remedy is the same; named below
            failure = exc
    raise PrefectApiError(
        f"Prefect's temporary server did not start within {timeout} s, {START_ATTEMPTS} tries "
        f"({first_line(failure)}): set {STARTUP_TIMEOUT_SETTING} higher, or run `prefect server start` and "
        "set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )
