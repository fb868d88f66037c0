"""`train-base-models` fanned out with prefect-dask's `DaskTaskRunner` over a local cluster of 2 worker
processes (Prefect in ephemeral test mode, MLflow on one SQLite store written by both workers)."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """A throwaway Prefect API (temporary SQLite database) with PREFECT_HOME in tmp."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect_home")}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield


@pytest.fixture
def dask_home(tmp_path, tiny_home, tiny_reference):
    """A fresh MSDDA_HOME holding only the session's tiny reference model and evaluator (so training starts
    from scratch, and nothing is written into the shared tiny home)."""
    home = tmp_path / "home"
    for part in ("reference", "classifiers"):
        shutil.copytree(tiny_home / part, home / part)
    return home


@pytest.mark.slow  # end to end, in the slow suite (the fast suite's 10-minute budget)
def test_train_base_models_on_dask_two_workers(
    prefect_harness, dask_home, tmp_path, tiny_config_file, monkeypatch
):
    from flows.pipeline import train_base_models
    from flows.registry import list_models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # before the cluster starts: its workers inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("MALLOC_TRIM_THRESHOLD_", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED"):
        monkeypatch.delenv(name, raising=False)  # the nanny sets its spawn environment here too: undone after

    results = train_base_models(
        objectives=None, runner="dask", config_path=str(tiny_config_file), home=str(dask_home)
    )

    assert set(results) == {"digit_alignment", "ink_economy"}
    pids = {r["pid"] for r in results.values()}
    assert len(pids) == 2 and os.getpid() not in pids, f"tasks ran in {pids}: not two Dask worker processes"
    # What the nanny gave its workers it also set in this process: not Dask's MALLOC_TRIM_THRESHOLD_=65536,
    # under which glibc returns freed memory at once and training ran 1.6x slower (docs/operations.md).
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    assert os.environ.get("MKL_NUM_THREADS") == "1"  # the nanny's spawn environment did reach here
    for objective, result in results.items():
        assert result["cached"] is False and result["registered"]["name"] == f"msdda-{objective}"
        assert result["registered"]["version"] == 1 and result["mlflow_run_id"]
    listed = {(m["name"], m["version"]) for m in list_models(dask_home)}
    assert listed == {("msdda-digit_alignment", 1), ("msdda-ink_economy", 1)}

    import mlflow

    client = mlflow.MlflowClient(uri)
    for result in results.values():  # every per-iteration metric of both concurrent writers landed
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert (
            len(client.get_metric_history(run.info.run_id, "reward_mean")) == 2
        )  # tiny config: 2 iterations
