"""benchmarks/compose_speed.py as a user runs it: from a fresh home (it pretrains and trains what is missing,
with gradients, then measures without them) on the tiny config, at a smoke-test size."""

import pytest

from tests.helpers import run_benchmark


@pytest.mark.slow  # end to end from an empty home: pretraining, four base models, then the measurement
@pytest.mark.timeout(1200)
def test_runs_from_a_fresh_home_on_the_tiny_config(tmp_path, tiny_config_file):
    home = tmp_path / "fresh_home"
    home.mkdir()
    args = ["--config", str(tiny_config_file), "--batches", "1", "--repeats", "2", "--device", "cpu"]
    report = run_benchmark(
        "compose_speed.py", [*args, "--lora-targets", "broad", "--json"], home, timeout=1100
    )
    assert report["device"] == "cpu" and report["unet"] == "embedded"
    own, broad = report["results"]  # the config's own set first, then each set named
    assert own["target_set"] == "attention" and broad["target_set"] == "broad"
    assert broad["adapted_layers"] > own["adapted_layers"] > 0
    for row in (own, broad):
        assert row["mode"] == "eager" and row["batch_size"] == 1 and row["models"] == 2 and row["steps"] == 4
        for key in ("floor_seconds", "msdda_seconds", "sequential_seconds"):
            assert row[key] > 0, key
        assert row["floor_seconds"] == min(row["floor_one_call_seconds"], row["floor_per_model_seconds"])
        assert 0 < row["compose_math_fraction"] < 1
    assert len(list((home / "base_models").iterdir())) == 4  # trained here, from nothing: two per set
