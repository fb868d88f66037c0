"""benchmarks/composition_results.py end to end on the tiny config: its --json contract (hypervolume with SE
and costs, the oracle's combined difference, J_w per method and curve point) and its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five models and ten small sweeps: about 5 minutes on 2 idle cores
def test_json_contract_on_the_tiny_model(tiny_config_file, pretrained_home, tmp_path):
    env = {**os.environ, "MSDDA_HOME": str(pretrained_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    results = tmp_path / "results"
    small = [
        "--num-images",
        "4",
        "--oracle-images",
        "4",
        "--curve-images",
        "4",
        "--methods",
        "msdda,db,code,rgg",
    ]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "composition_results.py"),
            "--config",
            str(tiny_config_file),
        ]
        + [*small, "--json", "--results", str(results)],
        capture_output=True,
        text=True,
        env=env,
        cwd=pretrained_home,
        timeout=1200,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    labels = {"msdda", "code", "rgg", "msdda@beta=0.005", "msdda@beta=0.0025", "code@N=4", "rgg@0.25"}
    assert labels <= set(report["hypervolume"]), sorted(report["hypervolume"])
    assert not {"db@beta=0.005", "rs@beta=0.005"} & set(report["hypervolume"]), (
        "curves of requested methods only"
    )
    for entry in report["hypervolume"].values():
        assert {"value", "se", "nfe", "reward_calls"} <= entry.keys()
        assert entry["se"] >= 0 and entry["kl"] >= 0
    assert report["hypervolume"]["code@N=4"]["nfe"] == 2 * report["hypervolume"]["code"]["nfe"]
    assert report["hypervolume"]["rgg"]["reward_calls"] > 0 == report["hypervolume"]["msdda"]["reward_calls"]
    assert [row["weights"] for row in report["oracle"]] == [[0.25, 0.75], [0.5, 0.5], [0.75, 0.25]]
    assert all({"combined_diff", "se"} <= row.keys() for row in report["oracle"])
    for label, rows in report["objective_J"].items():
        assert len(rows) == 3, label  # the tiny grid: w1 = 0, 0.5, 1
        for row in rows:
            assert row["J"] == pytest.approx(row["combined"] - report["beta"] * row["kl"])
    for name in ("composition.json", "pareto.png", "reward_kl.png", "variances.png"):
        assert (results / name).stat().st_size > 0
