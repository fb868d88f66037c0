"""Several processes (torchrun on CPU with gloo here; `accelerate launch --multi_gpu` on GPUs sets up the same
process group): gradients are averaged, so every process ends with the same weights though each draws its own
states."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_stay_in_sync(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(REPO / "tests" / "_distributed_toy.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert any(abs(w) > 0 for w in ranks[0]["weights"]), "training moved the weights"
