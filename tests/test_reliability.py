"""A training process killed with SIGKILL resumes from its last checkpoint when the command is run again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import TINY_CONFIG

REPO = Path(__file__).resolve().parents[1]


def test_killed_training_process_resumes(tmp_path, pretrained_home):
    config = {**TINY_CONFIG, "train": {**TINY_CONFIG["train"], "iterations": 40, "checkpoint_every": 2}}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    home = pretrained_home
    env = {**os.environ, "MSDDA_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flows.cli", "train", "--objective", "ink_economy", "--config", str(config_file),
               "--no-mlflow", "--json"]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    checkpoints = []
    while time.monotonic() < deadline and first.poll() is None:
        checkpoints = list(home.glob("checkpoints/*/checkpoint.json"))
        if checkpoints and json.loads(checkpoints[0].read_text())["iteration"] >= 4:
            break
        time.sleep(0.2)
    assert first.poll() is None, "training finished before it could be killed; give it more iterations"
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = json.loads(checkpoints[0].read_text())["iteration"]
    assert not list(home.glob("base_models/*/base_model.json")), "nothing was saved by the killed run"

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed_from = int(second.stderr.split("resuming from the checkpoint at iteration ")[1].split()[0])
    assert resumed_from >= killed_at >= 4
    meta = json.loads((Path(json.loads(second.stdout)["path"]) / "base_model.json").read_text())
    assert [h["iteration"] for h in meta["history"]] == list(range(1, 41))
    assert not list(home.glob("checkpoints/*/checkpoint.json")), "the checkpoint is removed once the model is saved"
