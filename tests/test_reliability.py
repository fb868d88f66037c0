"""A training process killed with SIGKILL resumes from its last checkpoint when the command is run again, and
ends with exactly the model an uninterrupted run trains."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import TINY_CONFIG, copy_pretrained
from tests.helpers import subprocess_env
from training.card import CARD_FILE, LORA_FILE, VARIANCE_FILE


def _saved_model(stdout: str) -> tuple[dict[str, tuple[dict, dict]], dict]:
    """``{file name: (tensors as bytes, metadata)}`` and the card. Compared by content, not file bytes:
    safetensors writes its metadata map in a per-process order."""
    path = Path(json.loads(stdout)["path"])
    files = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = {key: _bytes(value) for key, value in load_file(file).items()}
        with safe_open(file, framework="pt") as handle:
            files[file.name] = (tensors, handle.metadata())
    return files, json.loads((path / CARD_FILE).read_text())


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.slow  # end to end, in the slow suite (the fast suite's 10-minute budget)
def test_killed_training_process_resumes(tmp_path, tiny_home, pretrained_home):
    config = {**TINY_CONFIG, "train": {**TINY_CONFIG["train"], "iterations": 40, "checkpoint_every": 2}}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    home, straight_home = pretrained_home, copy_pretrained(tiny_home, tmp_path / "straight_home")
    # The same torch thread count in every run (the CLI takes torch's, which follows OMP_NUM_THREADS): float
    # reductions split over other thread counts may round differently. One thread each also lets the
    # uninterrupted run share the machine with the killed one.
    env = subprocess_env(MSDDA_HOME=home, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "train",
        "--objective",
        "ink_economy",
        "--config",
        str(config_file),
        "--no-mlflow",
        "--json",
    ]
    straight = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**env, "MSDDA_HOME": str(straight_home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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
    assert not list(home.glob(f"base_models/*/{CARD_FILE}")), "nothing was saved by the killed run"

    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert second.returncode == 0, second.stderr[-2000:]
    resumed_from = int(second.stderr.split("resuming from the checkpoint at iteration ")[1].split()[0])
    assert resumed_from >= killed_at >= 4
    resumed_files, resumed_meta = _saved_model(second.stdout)
    assert [h["iteration"] for h in resumed_meta["history"]] == list(range(1, 41))
    assert not list(home.glob("checkpoints/*/checkpoint.json")), "the checkpoint is removed once saved"

    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-2000:]
    assert "resuming" not in err
    straight_files, straight_meta = _saved_model(out)
    # bit-exact: the adapter and the variance offset, every tensor byte for byte, and so everything measured
    assert set(resumed_files) == {LORA_FILE, VARIANCE_FILE}
    assert resumed_files == straight_files, "the resumed run's model differs from the uninterrupted run's"

    def timeless(meta):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in meta["history"]]

    assert timeless(resumed_meta) == timeless(straight_meta)
    for key in ("reward_before", "reward_after", "reward_se", "kl", "unet_evaluations"):
        assert resumed_meta["metrics"][key] == straight_meta["metrics"][key], key
