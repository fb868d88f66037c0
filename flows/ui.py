"""``msdda ui``: the MLflow UI on the configured tracking/registry store, and the way to the Prefect UI.

The store is the one every other command uses (:func:`flows.tracking.tracking_uri`): the SQLite database
``$MSDDA_HOME/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` names another. ``mlflow server`` runs as a child
process in its own session, bound to ``127.0.0.1`` unless told otherwise; it is stopped (SIGTERM, then
SIGKILL) when the command ends, on Ctrl-C or SIGTERM. A tracking server (``http(s)://``) already serves its
own UI: nothing is started, its addresses are reported.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from configs.errors import MsddaError
from flows.tracking import is_remote, sqlite_path, tracking_uri

PREFECT_UI = "http://127.0.0.1:4200"
DEFAULT_HOST = "127.0.0.1"
"""The interface ``msdda ui`` binds unless told otherwise: this machine only."""
DEFAULT_PORT = 5000


class UiError(MsddaError, RuntimeError):
    """The UI cannot start: port in use, no registry, the server failed (one line)."""


@dataclass(frozen=True)
class UiInfo:
    """What ``msdda ui`` reports once the UI answers."""

    url: str
    store: str
    models: list[dict] = field(default_factory=list)
    """One ``{"name", "url", "versions", "champion"}`` per registered ``msdda-*`` model."""
    started: bool = True
    """False when the store is a tracking server, whose own UI is reported instead."""

    def as_dict(self) -> dict:
        return {
            "url": self.url,
            "store": self.store,
            "models": self.models,
            "started": self.started,
            "prefect": prefect_hint(),
        }


# ----------------------------------------------------------------------------------------------- addresses


def browser_host(host: str) -> str:
    """The host a browser on this machine uses for a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def base_url(host: str, port: int) -> str:
    host = browser_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def model_url(base: str, name: str) -> str:
    """The MLflow UI page of a registered model: its versions, aliases and tags."""
    return f"{base.rstrip('/')}/#/models/{urllib.parse.quote(name, safe='')}"


def model_version_url(base: str, name: str, version: int | str) -> str:
    return f"{model_url(base, name)}/versions/{version}"


def prefect_hint() -> str:
    """How to open the Prefect UI: the configured server's, else how to start one."""
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if api:
        return f"Prefect UI: {api.removesuffix('/api')} (PREFECT_API_URL)"
    return (
        f"Prefect UI: run `prefect server start` (then open {PREFECT_UI}) and export "
        f"PREFECT_API_URL={PREFECT_UI}/api before `msdda run` or `msdda deploy` so that their flow runs show "
        "there"
    )


# ------------------------------------------------------------------------------------------------ checks


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`UiError` if ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UiError(f"port {port} on {host} is in use: pick another with --port") from None
            raise UiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def check_store(home: Path) -> str:
    """The store's URI; a SQLite store that does not exist yet is a :class:`UiError` (nothing is created)."""
    uri = tracking_uri(home)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UiError(
            f"no MLflow registry at {database}: train a base model first (`msdda train` or `msdda run`), "
            "or point MSDDA_HOME or MLFLOW_TRACKING_URI at an existing one"
        )
    return uri


def registered_models(home: Path, base: str) -> list[dict]:
    """``{"name", "url", "versions", "champion"}`` per registered model, for the report."""
    from flows.registry import list_models

    by_name: dict[str, dict] = {}
    for row in list_models(home):
        entry = by_name.setdefault(
            row["name"],
            {"name": row["name"], "url": model_url(base, row["name"]), "versions": [], "champion": None},
        )
        entry["versions"].append(row["version"])
        if "champion" in row["aliases"]:
            entry["champion"] = row["version"]
    return list(by_name.values())


# ------------------------------------------------------------------------------------------------- server


def server_command(uri: str, host: str, port: int, artifact_root: str | None) -> list[str]:
    """``mlflow server`` on ``uri`` (tracking and registry), one worker: the process this command runs."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port)]
    command += ["--backend-store-uri", uri, "--registry-store-uri", uri, "--workers", "1"]
    if artifact_root:
        command += ["--default-artifact-root", artifact_root, "--no-serve-artifacts"]
    return command


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the server's process group, SIGKILL if it outlives ``grace`` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve_ui(
    home: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    on_ready: Callable[[UiInfo], None] | None = None,
    verbose: bool = False,
    startup_timeout: float = 180.0,
) -> UiInfo:
    """Run the MLflow UI on the configured store until Ctrl-C (``KeyboardInterrupt``) or SIGTERM.

    Checks first, changing nothing: the store exists, the port is free. ``on_ready`` gets the addresses once
    the UI answers. The server's own log goes to stderr with ``verbose``; otherwise only its last lines, in
    the error, if it fails. With a tracking server (``MLFLOW_TRACKING_URI=http...``) nothing is started:
    ``on_ready`` gets that server's addresses and the call returns.
    """
    uri = check_store(home)
    if is_remote(uri):
        from flows.registry import check_reachable

        check_reachable(home)
        info = UiInfo(uri.rstrip("/"), uri, registered_models(home, uri.rstrip("/")), started=False)
        if on_ready is not None:
            on_ready(info)
        return info
    check_port_free(host, port)
    base = base_url(host, port)
    models = registered_models(home, base)
    artifact_root = (home / "mlartifacts").as_uri() if sqlite_path(uri) is not None else None
    info = UiInfo(base, uri, models)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    last_lines: collections.deque[str] = collections.deque(maxlen=20)

    def drain(process: subprocess.Popen) -> None:  # keeps the pipe from filling; keeps the tail for errors
        assert process.stdout is not None
        for line in process.stdout:
            last_lines.append(line.rstrip())
            if verbose:
                sys.stderr.write(line)

    def failure(what: str) -> UiError:
        tail = next((line for line in reversed(last_lines) if line.strip()), "no output")
        return UiError(f"{what}: {tail.strip()}")

    previous = _raise_keyboard_interrupt_on_sigterm()
    try:
        process = subprocess.Popen(
            server_command(uri, host, port, artifact_root),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            start_new_session=True,  # Ctrl-C reaches this process only; it stops the server's whole group
        )
        try:
            reader = threading.Thread(target=drain, args=(process,), daemon=True)
            reader.start()
            deadline = time.monotonic() + startup_timeout
            while not _healthy(base):
                if process.poll() is not None:
                    reader.join(timeout=2)
                    raise failure(f"the MLflow server exited with code {process.returncode}")
                if time.monotonic() > deadline:
                    raise failure(
                        f"the MLflow server did not answer on {base} within {startup_timeout:.0f} s"
                    )
                time.sleep(0.3)
            if on_ready is not None:
                on_ready(info)
            while process.poll() is None:
                time.sleep(0.5)
            reader.join(timeout=2)
            raise failure(f"the MLflow server stopped with code {process.returncode}")
        finally:
            _stop(process)
    except KeyboardInterrupt:
        return info
    finally:
        _restore(previous)


def _raise_keyboard_interrupt_on_sigterm():
    """Treat SIGTERM like Ctrl-C while the UI runs (main thread only); returns the handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
