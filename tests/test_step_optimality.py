"""benchmarks/step_optimality.py end to end on the tiny config: its --json contract and the --profile mode."""

import math

import pytest

from tests.helpers import REPO, run_benchmark

ERR_KEYS = {"relative_drift_error", "cosine", "drift_ratio", "variance_ratio", "mc_se"}


def quadratic_tiny_config(folder):
    """The tiny config with configs/quadratic.yaml's objectives and train settings, but the tiny config's
    iteration budget, as a file in ``folder``."""
    import yaml

    from tests.conftest import TINY_CONFIG

    quadratic = yaml.safe_load((REPO / "configs" / "quadratic.yaml").read_text())
    config = {**TINY_CONFIG, "objectives": quadratic["objectives"]}
    config["train"] = {
        **TINY_CONFIG["train"],
        **quadratic["train"],
        "iterations": TINY_CONFIG["train"]["iterations"],
    }
    path = folder / "quadratic-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_step_optimality(args, home):
    return run_benchmark("step_optimality.py", [*args, "--quiet"], home, timeout=1500)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # base models, three oracles and the measurement: minutes on 2 idle cores
def test_json_contract_on_the_tiny_model(tiny_config_file, trained_home):
    """The report's JSON contract (the tiny base models come from the cache: their training is not what is
    checked here)."""
    small = ["--states", "2", "--actions", "8", "--bootstrap", "3", "--json"]
    report = run_step_optimality(["--config", str(tiny_config_file), *small], trained_home)
    assert set(report["base_models"]) == {"ink_economy", "digit_alignment"}
    assert [row["weights"] for row in report["composition"]] == [[0.25, 0.75], [0.5, 0.5], [0.75, 0.25]]
    assert set(report["rgg"]["single"]) == {"ink_economy", "digit_alignment"}  # both rewards have gradients
    entries = list(report["base_models"].values()) + list(report["rgg"]["single"].values())
    entries += [row[m] for row in report["composition"] for m in ("msdda", "db", "oracle", "rgg")]
    for err in entries:
        assert ERR_KEYS <= err.keys()
        assert len(err["per_step"]) == 4  # every DDIM step of the tiny config
        assert err["variance_ratio"] is None or err["variance_ratio"] > 0
        # noise-corrected, the cosine may leave [-1, 1] at 8 actions per state (training/step/optimum.py)
        assert err["cosine"] is None or math.isfinite(err["cosine"])
        assert {"path_relative_error", "path_cosine", "path_drift_ratio"} <= err.keys()


def test_profile_reports_the_optimum_at_reference_states(tiny_config_file, pretrained_home):
    args = ["--config", str(tiny_config_file), "--profile", "ink_economy,prototype_match:4"]
    rows = run_step_optimality(
        [*args, "--betas", "0.01,1", "--states", "2", "--actions", "16", "--json"], pretrained_home
    )
    assert set(rows) == {
        f"{name} beta={b}" for name in ("ink_economy", "prototype_match:4") for b in ("0.01", "1")
    }
    for steps in rows.values():
        assert [r["step"] for r in steps] == [0, 1, 2, 3]
        assert all(0 < r["ess_share"] <= 1 and r["variance_over_sigma2"] > 0 for r in steps)
    # a larger beta is a milder tilt: the weights spread over more actions
    mild, sharp = rows["prototype_match:4 beta=1"], rows["prototype_match:4 beta=0.01"]
    assert sum(r["ess_share"] for r in mild) > sum(r["ess_share"] for r in sharp)


def test_exact_check_on_latent_quadratics(tmp_path, pretrained_home):
    """``--exact`` on the tiny model with the two latent quadratic objectives: every figure is exact (no
    Monte-Carlo error), MSDDA's closed form applied to the exact base optima *is* the combined optimum, and
    DB's blend of the same optima is not (their curvatures differ tenfold)."""
    path = quadratic_tiny_config(tmp_path)
    args = ["--config", str(path), "--exact", "--no-oracle", "--states", "2", "--json"]
    report = run_step_optimality(args, pretrained_home)
    assert report["exact"] is True and set(report["base_models"]) == {"latent_prototype", "latent_blank"}
    for err in report["base_models"].values():  # the reference's chains are a part of all the states
        on_reference = err["on_reference_chains"]
        assert 0 <= on_reference["path_relative_error"] < math.inf
        assert on_reference["path_relative_error"] != pytest.approx(err["path_relative_error"], abs=1e-9)
    for row in report["composition"]:
        exact_msdda, exact_db = row["msdda_exact_bases"], row["db_exact_bases"]
        assert exact_msdda["mc_se"] == 0.0
        assert exact_msdda["relative_drift_error"] < 1e-3 and exact_msdda["path_relative_error"] < 1e-3
        assert exact_msdda["variance_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert exact_db["path_relative_error"] > 0.05 and exact_db["variance_ratio"] > 1.05
        assert math.isfinite(row["msdda"]["relative_drift_error"])  # the trained models' kernel


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fit_ceiling_on_latent_quadratics(tmp_path, pretrained_home):
    """``--fit-ceiling`` on the tiny model: its JSON contract, and a regression that learns where the
    optimum moves (an adapter that stays at the reference has path error exactly 1). The pooled figure
    over all steps can exceed 1 here: the last two steps, where the optimum barely moves, swing (issue 22)."""
    path = quadratic_tiny_config(tmp_path)
    small = ["--pool", "8", "--held-out", "4", "--iterations", "60", "--eval-every", "30", "--chains", "4"]
    sets = ["--sets", "attention:2,broad:2", "--steps", "2", "--lr", "0.03"]
    report = run_step_optimality(
        ["--config", str(path), "--fit-ceiling", *small, *sets, "--json"], pretrained_home
    )
    assert set(report["fit_ceiling"]) == {"latent_prototype", "latent_blank"}
    for fits in report["fit_ceiling"].values():
        assert set(fits) == {"attention_r2", "broad_r2"}
        for row in fits.values():
            assert [point["iterations"] for point in row["curve"]] == [30, 60]
            assert row["path_error"] == min(point["path_error"] for point in row["curve"])
            assert math.isfinite(row["path_error"]) and row["path_error"] > 0
            assert min(point["path_error_without_last_two"] for point in row["curve"]) < 1
            assert all(point["path_cosine_without_last_two"] > 0 for point in row["curve"])
        assert fits["broad_r2"]["params"] > fits["attention_r2"]["params"] > 0
        assert fits["broad_r2"]["modules"] > fits["attention_r2"]["modules"] > 0
