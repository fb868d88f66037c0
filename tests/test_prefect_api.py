"""`msdda run` makes sure of the Prefect API before any expensive work (``flows.prefect_api``): a configured
server that is down, or a temporary server that does not start (after one retry), is one line and exit 2
within seconds; and the first run in a fresh ``PREFECT_HOME`` survives a busy machine."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, run_msdda, run_python, subprocess_env

SERVER_APP = "prefect.server.api.server:create_app"


def _msdda_run(
    config: Path, home: Path, prefect_home: Path, timeout: float = 900, **extra: str
) -> subprocess.CompletedProcess:
    """`msdda run --config CONFIG --json` as a user runs it: a subprocess with its own homes, no Prefect or
    MLflow settings from this environment but ``extra``, killed after ``timeout`` seconds."""
    return run_msdda(
        ["run", "--config", str(config), "--json"],
        home.parent,
        home,
        timeout=timeout,
        without_prefixes=("PREFECT_", "MLFLOW_"),
        PREFECT_HOME=prefect_home,
        OMP_NUM_THREADS="1",
        **extra,
    )


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def _servers_of(prefect_home: Path) -> list[int]:
    """Process ids of the Prefect temporary servers still running on ``prefect_home``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if SERVER_APP in (proc / "cmdline").read_text() and (
                f"PREFECT_HOME={prefect_home}\0" in (proc / "environ").read_text()
            ):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0]) and message in errors[0], result.stderr[-3000:]


def test_unreachable_prefect_api_url_is_one_line_before_any_work(tiny_config_file, pretrained_home, capfd):
    """A PREFECT_API_URL that nobody answers: one line naming it and the remedy, exit 2, in seconds, before
    the rewards are loaded or anything trained (today: the flow's retries, then a traceback)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    before = _files(pretrained_home)
    url = f"http://127.0.0.1:{free_port()}/api"
    start = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        code = main(["run", "--config", str(tiny_config_file), "--json"])
    seconds = time.monotonic() - start
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err, err[-3000:]
    assert err.startswith(f"error: Prefect server at {url} is unreachable: ") and err.count("\n") == 1, err
    assert "prefect server start" in err and "unset PREFECT_API_URL" in err
    assert _files(pretrained_home) == before, "nothing was trained or written"
    assert seconds < 30, seconds


def test_temporary_server_that_cannot_start_is_retried_once_then_one_line(
    tmp_path, tiny_config_file, pretrained_home
):
    """The user's startup timeout (here 0 s: no server can be up in time) is honoured; the temporary server
    is tried twice, then one line names the cause and both remedies, before any work, and no server process
    outlives the command."""
    before = _files(pretrained_home)
    prefect_home = tmp_path / "prefect"
    result = _msdda_run(
        tiny_config_file,
        pretrained_home,
        prefect_home,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    _assert_one_line_error(result, "error: Prefect's temporary server did not start within 0 s, 2 tries (")
    for remedy in ("STARTUP_TIMEOUT_SECONDS higher", "prefect server start", "PREFECT_API_URL"):
        assert remedy in result.stderr
    assert result.stderr.count("Starting temporary server") == 2, result.stderr[-3000:]
    assert _files(pretrained_home) == before, "nothing was trained or written"
    assert _servers_of(prefect_home) == []


@pytest.mark.slow  # two servers that fail to start: 20-27 s on 2 busy cores
def test_temporary_server_on_a_corrupt_database_is_one_line_within_seconds(
    tmp_path, tiny_config_file, pretrained_home
):
    """A PREFECT_HOME whose prefect.db is not a database: the temporary server exits at start (uvicorn's exit
    code 3, which Prefect takes for a port in use and answers with a new server on a new port, for ever). The
    command stops within seconds with one line naming the database and the remedy, the server's traceback
    kept off the terminal; the database is left as it was and no server process outlives the command."""
    before = _files(pretrained_home)
    prefect_home = tmp_path / "prefect"
    prefect_home.mkdir()
    database = prefect_home / "prefect.db"
    database.write_bytes(b"not a database\n" * 1000)
    start = time.monotonic()
    temporary = tmp_path / "tmp"  # where the server's stderr goes
    temporary.mkdir()
    result = _msdda_run(tiny_config_file, pretrained_home, prefect_home, timeout=120, TMPDIR=str(temporary))
    seconds = time.monotonic() - start
    cause = "exit code 3: sqlalchemy.exc.DatabaseError"
    _assert_one_line_error(result, f"Prefect's temporary server exited at start, 2 tries ({cause}")
    assert f"is its database {database} corrupt or locked? Move it aside" in result.stderr, result.stderr
    assert "prefect server start" in result.stderr and "PREFECT_API_URL" in result.stderr
    assert seconds < 60, seconds
    (log,) = temporary.glob("msdda-prefect-server-*.log")
    assert f"its log: {log})" in result.stderr  # both tries' tracebacks
    assert log.read_text().count("Application startup failed") == 2
    assert database.read_bytes() == b"not a database\n" * 1000
    assert _files(pretrained_home) == before, "nothing was trained or written"
    assert _servers_of(prefect_home) == []


def test_startup_timeout_is_raised_unless_the_user_set_it(tmp_path, monkeypatch):
    """180 s by default (Prefect's 20 s is too short for a fresh home on a busy machine); the user's own
    value wins, whether from the environment or from the Prefect profile."""
    script = "from flows.prefect_api import startup_timeout; print(startup_timeout())"

    def timeout(**extra: str) -> int:
        env = subprocess_env(without_prefixes=["PREFECT_"], PREFECT_HOME=tmp_path / "prefect", **extra)
        result = run_python(["-c", script], env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.strip())

    assert timeout() == 180
    assert timeout(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="7") == 7
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = "9"\n'
    )
    assert timeout(PREFECT_PROFILES_PATH=str(profiles)) == 9


@pytest.mark.slow  # three cached runs, each with a fresh Prefect server, in the session's filled tiny home
def test_first_run_in_a_fresh_prefect_home_survives_a_busy_machine(tmp_path, tiny_run):
    """`msdda run` (cached: only the flow and its temporary server start) in a brand-new PREFECT_HOME, beside
    three CPU-bound processes, succeeds three times in a row; how long the server took to start is printed
    (`pytest -s`). The home was filled by the session's ``tiny_run`` (shared with test_cli)."""
    filled = tiny_run.result
    assert filled.returncode == 0, filled.stderr[-3000:]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        for attempt in range(3):
            prefect_home = tmp_path / f"prefect-{attempt}"
            start = time.monotonic()
            result = _msdda_run(tiny_run.config, tiny_run.home, prefect_home, PREFECT_LOGGING_LEVEL="INFO")
            seconds = time.monotonic() - start
            assert result.returncode == 0, result.stderr[-3000:]
            assert "Traceback" not in result.stderr, result.stderr[-3000:]
            started = re.findall(r"temporary server up in ([\d.]+) s", result.stderr)
            assert len(started) == 1, result.stderr[-3000:]  # one server for the whole run
            assert result.stderr.count("Starting temporary server") == 1, result.stderr[-3000:]
            print(f"run {attempt + 1}: temporary server up in {started[0]} s, whole run {seconds:.1f} s")
    finally:
        for process in busy:
            process.kill()
            process.wait()
