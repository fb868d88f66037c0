"""MLflow store and server failures (issue 20), against real MLflow: a real SQLite store, and in the slow
suite a real `mlflow server` on 127.0.0.1 that is killed. Each is one line, exit code 2, no traceback, nothing
lost: a corrupt store file is named and left as it is; a server that goes away is named by its URL within a
minute; `--json` stdout stays one JSON object; an empty home's `models` creates nothing; MLflow's INFO lines
stay off the terminal; a run left RUNNING by a killed process is marked failed when the next one starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import fake_base_model, free_port, run_python, subprocess_env


def damage(database: Path, how: str) -> None:
    """Overwrite a store with garbage, cut it to half its size, or empty it."""
    if how == "garbage":
        database.write_bytes(os.urandom(4096))
    elif how == "truncated":
        with open(database, "r+b") as handle:
            handle.truncate(database.stat().st_size // 2)
    else:
        database.write_bytes(b"")


def one_line_error(err: str) -> str:
    """The single stderr line of a failed command (asserting that it is one line and no traceback)."""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


# --------------------------------------------------------------------------------------------- corrupt store

COMMANDS = {
    "models": ["models"],
    "train": ["train", "--objective", "ink_economy", "--json"],
    "compose": ["compose", "--weights", "0.5,0.5", "--json"],
}


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_corrupt_store_is_one_line_naming_the_file_and_left_as_is(
    store_home, tiny_config_file, capfd, command, how
):
    from flows.cli import main

    database = store_home / "mlflow.db"
    damage(database, how)
    before = database.read_bytes()
    args = COMMANDS[command] + ([] if command == "models" else ["--config", str(tiny_config_file)])
    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    line = one_line_error(err)
    assert code == 2 and out == ""
    assert f"the MLflow store {database} is corrupt" in line and "move it aside" in line
    assert database.read_bytes() == before  # neither repaired nor removed
    assert sorted(p.name for p in store_home.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.parametrize("command", ["models", "train"])
def test_a_store_that_is_not_a_file_is_one_line_at_once(store_home, tiny_config_file, capfd, command, kind):
    """``mlflow.db`` a directory (or a named pipe): one line naming it, at once. Before, MLflow retried
    opening it for about 106 s, printing 37 warnings, then failed with a traceback."""
    from flows.cli import main

    database = store_home / "mlflow.db"
    database.unlink()
    if kind == "directory":
        database.mkdir()
        (database / "the user's file").write_text("kept")
    else:
        os.mkfifo(database)
    args = COMMANDS[command] + ([] if command == "models" else ["--config", str(tiny_config_file)])
    capfd.readouterr()
    start = time.monotonic()
    code = main(args)
    seconds = time.monotonic() - start
    out, err = capfd.readouterr()
    line = one_line_error(err)
    assert code == 2 and out == ""
    assert f"the MLflow store {database} is " in line and "move it aside" in line, line
    assert ("a directory" if kind == "directory" else "not a regular file") in line
    assert seconds < 60, seconds
    if kind == "directory":
        assert [p.name for p in database.iterdir()] == ["the user's file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
def test_a_store_this_user_may_not_read_is_one_line(store_home, capfd):
    from flows.cli import main

    database = store_home / "mlflow.db"
    database.chmod(0)
    try:
        capfd.readouterr()
        assert main(["models"]) == 2
        line = one_line_error(capfd.readouterr().err)
        assert "cannot be read and written" in line and "chmod u+rw" in line
    finally:
        database.chmod(0o644)


# ---------------------------------------------------------------------------------- a traceback MLflow logs


def test_a_traceback_mlflow_logs_stays_off_the_terminal(store_home, tiny_config_file, capfd):
    """MLflow logs a failed SQLAlchemy call (a full disk: "database or disk is full") at ERROR with about 90
    lines of traceback, then raises. Here a real one: the store refuses to create the experiment (a trigger
    that writes to a missing table). The terminal gets MLflow's first line and the command's own, both naming
    one log file that holds both tracebacks; a line MLflow logs without a traceback is left as it is."""
    import logging
    import sqlite3

    from flows.cli import main

    with sqlite3.connect(store_home / "mlflow.db") as database:
        database.execute(
            "create trigger refuse before insert on experiments "
            "begin insert into missing_table values (1); end"
        )
    capfd.readouterr()
    code = main(["train", "--objective", "ink_economy", "--config", str(tiny_config_file)])
    logging.getLogger("mlflow.tracking").warning("an ordinary line\nwith a second")
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 4, err
    logged, failure = lines[0], lines[1]
    assert "ERROR mlflow" in logged and "SQLAlchemy database error" in logged, logged
    assert failure.startswith("error: ") and "no such table: main.missing_table" in failure, failure
    log = logged.rsplit("(traceback: ", 1)[1].removesuffix(")")
    assert failure.endswith(f"(traceback: {log})")
    text = Path(log).read_text()
    assert text.count("Traceback (most recent call last)") >= 2 and "msdda train --objective" in text
    assert lines[2].endswith("an ordinary line") and lines[3] == "with a second"


# ------------------------------------------------------------------------------------------- empty home, INFO


def test_models_on_an_empty_home_creates_nothing(tmp_path, monkeypatch, capfd):
    from flows.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "empty_home"
    monkeypatch.setenv("MSDDA_HOME", str(home))
    capfd.readouterr()
    assert main(["models"]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("no registered base models") and err == ""
    assert main(["models", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"models": []} and err == ""
    assert not home.exists()


STORE_SCRIPT = """
import sys
from pathlib import Path
from flows.tracking import mlflow_run

with mlflow_run(Path(sys.argv[1]), "probe", params={"a": 1}):
    pass
"""


def test_creating_the_store_prints_nothing(tmp_path):
    """A new SQLite store (MLflow creates and migrates it) and a run in it: nothing on the terminal (MLflow
    prints INFO lines while it migrates, unless told otherwise)."""
    env = subprocess_env(without_prefixes=["MLFLOW_"])
    result = run_python(["-c", STORE_SCRIPT, str(tmp_path / "home")], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "" and result.stderr == ""


# --------------------------------------------------------------------------------------------- stale runs


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_runs_left_running_by_a_killed_process_are_marked_failed(store_home):
    from flows.tracking import HOST_TAG, PID_TAG, ensure_experiment, mlflow_client, mlflow_run

    client = mlflow_client(store_home)
    experiment = ensure_experiment(client, store_home)
    host = socket.gethostname()

    def running(name: str, tags: dict) -> str:
        return client.create_run(experiment, run_name=name, tags=tags).info.run_id

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = running("killed -9", {HOST_TAG: host, PID_TAG: str(dead_pid())})
        live = running("concurrent", {HOST_TAG: host, PID_TAG: str(sleeper.pid)})
        elsewhere = running("other host", {HOST_TAG: host + "-elsewhere", PID_TAG: str(dead_pid())})
        untagged = running("no process tags", {})
        with mlflow_run(store_home, "train ink_economy beta=0.01", params={"objective": "ink_economy"}) as (
            run,
            _,
        ):
            status = {r: client.get_run(r).info.status for r in (stale, live, elsewhere, untagged)}
            assert client.get_run(run.info.run_id).data.tags[PID_TAG] == str(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
    assert status == {stale: "FAILED", live: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    assert "ended without closing the run" in client.get_run(stale).data.tags["msdda.stale"]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------------------- a tracking server


class TrackingServer:
    """A real `mlflow server` on 127.0.0.1 (serving its artifacts) on a copy of a migrated SQLite store."""

    def __init__(self, folder: Path, template_db: Path) -> None:
        folder.mkdir(parents=True)
        shutil.copy(template_db, folder / "mlflow.db")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        store = f"sqlite:///{folder / 'mlflow.db'}"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--backend-store-uri", store, "--workers", "1"]
        command += ["--artifacts-destination", str(folder / "artifacts")]
        self.log = open(folder / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder
        )
        deadline = time.monotonic() + 240
        while not self.healthy():
            assert self.process.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the server and its worker)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture
def server(tmp_path, template_db, monkeypatch):
    started = TrackingServer(tmp_path / "server", template_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", started.url)
    yield started
    started.kill()


@pytest.mark.slow  # starts a real mlflow server and composes on the tiny model (about 40 s on 2 cores)
def test_json_output_is_one_object_with_a_tracking_server(
    server, pretrained_home, tiny_base_models, tiny_config_file, tmp_path, capfd
):
    from flows.cli import main

    models = ",".join(str(folder) for folder in tiny_base_models)
    capfd.readouterr()
    code = main(
        ["compose", "-w", "0.5,0.5", "-m", models, "-n", "2", "--out", str(tmp_path / "images")]
        + ["--config", str(tiny_config_file), "--json"]
    )
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    payload = json.loads(out)  # the whole of stdout: no "View run ... at:" lines before it
    assert payload["mlflow_run_id"] and "View run" not in err + out
    from flows.tracking import mlflow_client

    assert mlflow_client(pretrained_home).get_run(payload["mlflow_run_id"]).info.status == "FINISHED"


TRAIN_ITERATIONS = 400
"""Long enough for the tiny model's training to outlive the server (it is killed once the run starts)."""


@pytest.mark.slow  # a real mlflow server, a training killed under it, then commands against it (about 90 s)
def test_a_server_that_goes_away_is_one_line_within_a_minute(
    server, pretrained_home, tiny_config_file, tmp_path, capfd
):
    from flows.cli import main
    from flows.registry import RegistryError, _client, _registry_errors, _versions, register_base_model
    from flows.tracking import TrackingError, mlflow_client

    folder = fake_base_model(tmp_path / "model", "ink_economy", seed=1)
    register_base_model(pretrained_home, folder)
    env = subprocess_env(MSDDA_HOME=pretrained_home)
    training = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "-o", "ink_economy", "--json"]
        + ["--config", str(tiny_config_file), "--set", f"train.iterations={TRAIN_ITERATIONS}"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = mlflow_client(pretrained_home)
    registry_client = _client(pretrained_home)  # opened while the server runs
    try:
        deadline = time.monotonic() + 240
        while not client.search_runs(["0", "1"], filter_string="attributes.status = 'RUNNING'"):
            assert training.poll() is None, training.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the training run never started"
            time.sleep(0.5)
        time.sleep(2)  # a few iterations logged
        server.kill()
        killed = time.monotonic()
        out, err = training.communicate(timeout=120)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
    assert time.monotonic() - killed < 60
    line = one_line_error(err)
    assert training.returncode == 2 and out == ""
    assert f"the MLflow tracking server at {server.url} stopped answering" in line

    start = time.monotonic()
    with (
        pytest.raises(TrackingError, match=f"tracking server at {server.url} stopped answering"),
        _registry_errors(pretrained_home, "listing versions"),
    ):
        _versions(registry_client, "msdda-ink_economy")
    assert time.monotonic() - start < 30

    start = time.monotonic()
    capfd.readouterr()
    assert main(["models"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and f"MLflow tracking server at {server.url} is unreachable" in one_line_error(err)
    with pytest.raises(RegistryError, match="unreachable"):
        register_base_model(pretrained_home, folder)
    assert time.monotonic() - start < 30


def test_a_failed_request_to_another_host_is_not_blamed_on_the_tracking_server(monkeypatch, tmp_path):
    """With a tracking server configured, a connection failure of another request made during a run (a model
    hub download) keeps its own error; one to the server becomes the server's one line."""
    import requests

    from flows.tracking import store_failure

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")

    def refused(url: str) -> requests.ConnectionError:
        return requests.ConnectionError("connection refused", request=requests.Request("GET", url).prepare())

    elsewhere = refused("https://huggingface.co/api/models/some/model")
    assert store_failure(tmp_path, "training", elsewhere) is None
    to_server = refused("http://127.0.0.1:5999/api/2.0/mlflow/runs/log-batch")
    error = store_failure(tmp_path, "training", to_server)
    assert error is not None and "tracking server at http://127.0.0.1:5999 stopped answering" in str(error)
