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
cause and the remedy. It watches Prefect's start on a wall clock of its own: a server process that exits
(say on a corrupt or locked database) fails within a second, where Prefect would wait out its timeout or,
for uvicorn's exit code 3, start servers on new ports for ever; the server's stderr goes to a temporary
file, so that its traceback does not reach the terminal. The server it starts is Prefect's own process-wide
one (``SubprocessASGIServer()``, a singleton), which every Prefect client of this process then reuses; it
stops when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from configs.errors import MsddaError, first_line

STARTUP_TIMEOUT_SECONDS = 180
"""How long the temporary server may take to start unless ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
is set (Prefect's default is 20 s): a fresh ``PREFECT_HOME`` took 49-77 s on 2 cores beside three CPU-bound
processes (``tests/test_prefect_api.py``, slow)."""
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
HEALTHCHECK_SECONDS = 5.0
"""How long a configured Prefect server (``PREFECT_API_URL``) may take to answer the health check."""
START_ATTEMPTS = 2
START_POLL_SECONDS = 0.2
"""How often the start of the temporary server is looked at: whether its process still runs."""
STARTED_LOGGER = "msdda"
"""Prefect's logger (``prefect.msdda``) that reports how long the temporary server took to start."""
SERVER_REMEDY = "start it (`prefect server start`) or point PREFECT_API_URL at one that runs"
OWN_SERVER_REMEDY = "run `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"


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


class ServerExitedError(RuntimeError):
    """The temporary server's process exited while it started."""


def _database() -> str:
    """The temporary server's database as a user finds it: its SQLite file, else the setting that names it."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    text = url.get_secret_value() if url else ""
    sqlite = "sqlite+aiosqlite:///"
    return text.removeprefix(sqlite) if text.startswith(sqlite) else "PREFECT_API_DATABASE_CONNECTION_URL"


def _new_server_log() -> Path:
    """A new file for the temporary server's stderr (of every try), removed when this process exits if
    nothing was written to it (on a failed start, the error names it)."""
    handle, name = tempfile.mkstemp(prefix="msdda-prefect-server-", suffix=".log")
    os.close(handle)
    log = Path(name)
    atexit.register(_remove_if_empty, log)  # runs after Prefect's own atexit stop of the server
    return log


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


def _spawn_with_stderr_to(server, log: Path) -> None:
    """Make ``server`` start its processes with their stderr in ``log`` (Prefect passes none: a child inherits
    this process's), so that a failed start's traceback is kept there instead of reaching the terminal."""
    spawn = server._run_uvicorn_command  # Prefect 3's one place that starts the process

    def spawn_with_stderr_to_log():
        sys.stderr.flush()
        terminal = os.dup(2)
        try:
            with open(log, "ab") as handle:
                os.dup2(handle.fileno(), 2)
            return spawn()
        finally:
            os.dup2(terminal, 2)
            os.close(terminal)

    server._run_uvicorn_command = spawn_with_stderr_to_log


def _last_words(log: Path) -> str:
    """The last line of ``log`` that names an exception (uvicorn ends with "Application startup failed"),
    else its last line; empty if nothing was written."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    return (named or lines or [""])[-1]


def _watch_start(server, starter: threading.Thread, deadline: float, log: Path) -> None:
    """Wait while ``starter`` runs Prefect's start of ``server``: a :class:`ServerExitedError` as soon as the
    server's process exits (Prefect would start another on a new port, endlessly when uvicorn exits with 3,
    its code for a port in use but also for any failed start), a :class:`TimeoutError` at ``deadline``
    (wall-clock time; Prefect counts only its own sleeps)."""
    process = None
    while starter.is_alive():
        process = process or server.server_process
        if process is not None and process.poll() is not None:
            words = _last_words(log)
            raise ServerExitedError(
                f"exit code {process.returncode}" + (f": {words}; its log: {log}" if words else "")
            )
        if time.monotonic() >= deadline:
            raise TimeoutError("its health check did not answer in time")
        starter.join(START_POLL_SECONDS)


def _stop(server, starter: threading.Thread) -> None:
    """Stop ``server`` and wait for ``starter`` to give up, so that no process it started is left running."""
    while starter.is_alive():
        server.stop()  # Prefect's start fails at its next look at the process (within its health check)
        starter.join(1.0)
    server.stop()  # a process it started while it was stopped


def _start_temporary_server(timeout: int, log: Path) -> str:
    """Start Prefect's process-wide temporary server (unless it runs), its stderr in ``log``, and return its
    API URL, logging how long it took. Prefect's start runs in a thread watched by :func:`_watch_start`; a
    server that did not start is stopped again, no process of it left."""
    from prefect.logging import get_logger
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return server.api_url
    _spawn_with_stderr_to(server, log)
    failures: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
            failures.append(exc)

    began = time.monotonic()
    starter = threading.Thread(target=start, name="prefect-temporary-server-start", daemon=True)
    starter.start()
    try:
        _watch_start(server, starter, began + timeout, log)
        if failures:
            raise failures[0]
    except BaseException:
        _stop(server, starter)
        raise
    seconds = time.monotonic() - began
    get_logger(STARTED_LOGGER).info(f"temporary server up in {seconds:.1f} s (its stderr: {log})")
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
    log = _new_server_log()
    failure: Exception | None = None
    for _ in range(START_ATTEMPTS):
        try:
            return _start_temporary_server(timeout, log)
        except Exception as exc:  # noqa: BLE001 - whatever stops it, the remedies are these; named below
            failure = exc
    if isinstance(failure, ServerExitedError):
        raise PrefectApiError(
            f"Prefect's temporary server exited at start, {START_ATTEMPTS} tries ({failure}): is its "
            f"database {_database()} corrupt or locked? Move it aside, or {OWN_SERVER_REMEDY}"
        )
    raise PrefectApiError(
        f"Prefect's temporary server did not start within {timeout} s, {START_ATTEMPTS} tries "
        f"({first_line(failure)}): set {STARTUP_TIMEOUT_SETTING} higher, or {OWN_SERVER_REMEDY}"
    )
