"""`msdda ui`: the real MLflow server on a real registry (SQLite, versions registered by the registry layer),
started as a user starts it and stopped with Ctrl-C; its bad-input contract; the Prefect link artifacts over
http; and, in the slow suite, the registered model page rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import fake_base_model, free_port, run_python, subprocess_env


@pytest.fixture
def registry(store_home, tmp_path):
    """Three registered versions: ink_economy v1 (champion), v2 (weak), digit_alignment v1 (champion)."""
    from flows.registry import register_base_model

    home = store_home

    register_base_model(home, fake_base_model(tmp_path / "a", "ink_economy", seed=1, rise_in_se=6.0))
    register_base_model(home, fake_base_model(tmp_path / "b", "ink_economy", seed=2, rise_in_se=2.0))
    register_base_model(home, fake_base_model(tmp_path / "c", "digit_alignment", seed=3, rise_in_se=4.0))
    return home


class UiProcess:
    """``msdda ui --json`` as a real subprocess; ``info`` is the JSON line it prints once the UI answers."""

    def __init__(self, home: Path, port: int, cwd: Path) -> None:
        env = subprocess_env(without=["MLFLOW_TRACKING_URI"], MSDDA_HOME=home)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--json"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        line = _readline(self.process, timeout=240)
        assert line, f"msdda ui printed nothing; stderr: {''.join(self.stderr)[-3000:]}"
        self.info = json.loads(line)

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C, as a terminal sends it; the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _readline(process: subprocess.Popen, timeout: float) -> str:
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else ""


@pytest.fixture
def ui(registry, tmp_path):
    started = UiProcess(registry, free_port(), tmp_path)
    yield started
    started.close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


# ------------------------------------------------------------------------------------------------- fast


def test_ui_serves_the_registry_and_stops_on_ctrl_c(ui, registry):
    info, base = ui.info, ui.info["url"]
    assert base.startswith("http://127.0.0.1:") and info["started"] is True
    assert info["store"] == f"sqlite:///{registry / 'mlflow.db'}"
    assert {m["name"]: (m["versions"], m["champion"], m["url"]) for m in info["models"]} == {
        "msdda-digit_alignment": ([1], 1, f"{base}/#/models/msdda-digit_alignment"),
        "msdda-ink_economy": ([1, 2], 1, f"{base}/#/models/msdda-ink_economy"),
    }
    assert "prefect server start" in info["prefect"] and "PREFECT_API_URL" in info["prefect"]

    # the server behind the page reads this registry: the alias and the version descriptions
    model = get_json(f"{base}/ajax-api/2.0/mlflow/registered-models/get?name=msdda-ink_economy")
    assert model["registered_model"]["aliases"] == [{"alias": "champion", "version": "1"}]
    with urllib.request.urlopen(base + "/", timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read(4096).lower()

    port = int(base.rsplit(":", 1)[1])
    start = time.perf_counter()
    assert ui.interrupt() == 0
    assert time.perf_counter() - start < 30
    err = "".join(ui.stderr)
    assert "stopped the MLflow UI" in err and "Traceback" not in err, err[-3000:]
    from flows.ui import check_port_free

    check_port_free("127.0.0.1", port)  # the server is gone, port free again


def test_port_in_use_is_one_line_and_starts_nothing(registry, capfd):
    from flows.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        capfd.readouterr()
        code = main(["ui", "--port", str(port)])
        out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert err == f"error: port {port} on 127.0.0.1 is in use: pick another with --port\n"


def test_missing_registry_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capfd):
    from flows.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "empty_home"
    monkeypatch.setenv("MSDDA_HOME", str(home))
    capfd.readouterr()
    code = main(["ui", "--port", str(free_port())])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: no MLflow registry at {home / 'mlflow.db'}: train a base model first")
    assert not home.exists()


LINK_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from prefect import flow, get_client
from flows.pipeline import _publish
from flows.tracking import mlflow_run

@flow(name="link-probe")
def probe(home: str) -> str:
    with mlflow_run(Path(home), "probe") as (run, _):
        run_id = run.info.run_id
    _publish("probe", [{"a": 1}], "probe", link=home + "/pareto.png", home=home, run_id=run_id,
             artifact="pareto.png")
    return run_id

async def links():
    async with get_client() as client:
        return {a.key: a.data for a in await client.read_artifacts()}

run_id = probe(sys.argv[1])
print(json.dumps({"run_id": run_id, "artifacts": asyncio.run(links())}))
"""


@pytest.mark.slow  # Prefect's temporary server takes a minute or two to start on 2 busy cores
def test_prefect_link_artifact_opens_the_mlflow_run_over_http(ui, registry, tmp_path):
    """With MLFLOW_TRACKING_URI at a server (the one `msdda ui` started), a flow's link artifact is that
    run's page in the server's UI, not a file:// URI."""
    base = ui.info["url"]
    env = subprocess_env(MLFLOW_TRACKING_URI=base)
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DO_NOT_TRACK="true")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a busy 2-core machine
    result = run_python(["-c", LINK_SCRIPT, str(tmp_path / "flow_home")], env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    run_id = payload["run_id"]
    from mlflow import MlflowClient

    experiment = MlflowClient(base).get_run(run_id).info.experiment_id
    url = f"{base}/#/experiments/{experiment}/runs/{run_id}/artifactPath/pareto.png"
    assert payload["artifacts"]["probe-plot"] == f"[MLflow run {run_id[:8]}: pareto.png]({url})"


def test_mlflow_link_is_none_for_a_local_store(store_home):
    from flows.tracking import mlflow_link

    assert mlflow_link(store_home, "0" * 32) is None


# ------------------------------------------------------------------------------------------------- slow


def _chromium_or_skip() -> str:
    from benchmarks.chromium import CANDIDATES, find_chromium

    binary = find_chromium()
    if binary is None and os.environ.get("CI") == "true":
        pytest.fail("CI=true but no Chromium binary: .ci/run installs Debian's chromium package")
    if binary is None:
        pytest.skip(
            f"no Chromium binary on PATH (looked for {', '.join(CANDIDATES)}; `apt-get install chromium`)"
        )
    return binary


@pytest.mark.slow
def test_registered_model_page_in_headless_chromium(ui):
    """The registered model page as a browser renders it (the MLflow UI is a React app): both versions,
    the champion alias on v1, the lineage tags, and the version page's description."""
    from benchmarks.chromium import Browser

    binary = _chromium_or_skip()
    from flows.ui import model_version_url

    base = ui.info["url"]
    model = next(m for m in ui.info["models"] if m["name"] == "msdda-ink_economy")
    with Browser(binary, timeout=120) as browser:
        browser.open(model["url"])
        text = browser.wait_for_text(["msdda-ink_economy", "Version 1", "Version 2", "champion"])
        for tag in ("objective", "reference_hash", "trainer", "content_hash", "git_sha", "rise_in_se"):
            assert tag in text, tag
        assert "ref-aaaa" in text and "step_level" in text
        browser.open(model_version_url(base, "msdda-ink_economy", 1))
        version = browser.wait_for_text(["champion: the reward rose by more than 3 SE", "reward_after"])
        assert "held-out reward 0.2000 -> 0.2600 (rise +6.0 SE" in version
