"""benchmarks/composition_results.py end to end on the tiny config: its --json contract (hypervolume with SE
and costs, the oracle's combined difference, J_w per method and curve point) and its figures."""

import pytest

from tests.helpers import run_benchmark


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five models and ten small sweeps: about 5 minutes on 2 idle cores
def test_json_contract_on_the_tiny_model(tiny_config_file, trained_home, tmp_path):
    """The report's JSON contract and figures (the two tiny base models at the config's beta come from the
    cache; the others are trained here)."""
    results = tmp_path / "results"
    small = [
        "--num-images",
        "4",
        "--oracle-images",
        "4",
        "--curve-images",
        "4",
        "--methods",
        "msdda,code,rgg",
    ]
    args = ["--config", str(tiny_config_file), *small, "--json", "--results", str(results)]
    report = run_benchmark("composition_results.py", args, trained_home, timeout=1500)
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
