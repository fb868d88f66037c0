"""`train-base-models` fanned out with prefect-dask's `DaskTaskRunner` over a local cluster of 2 worker
processes (Prefect in ephemeral test mode, MLflow on one SQLite store written by both workers)."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def dask_home(tmp_path, tiny_home, tiny_reference):
    """A fresh MSDDA_HOME holding only the session's tiny reference model and evaluator (so training starts
    from scratch, and nothing is written into the shared tiny home)."""
    home = tmp_path / "home"
    for part in ("reference", "classifiers"):
        shutil.copytree(tiny_home / part, home / part)
    return home


@pytest.mark.parametrize(
    ("pending", "idle_cpus", "device", "workers"),
    [
        (2, 2, "cpu", 2),  # the default pair on 2 idle cores: one single-threaded worker each
        (3, 2, "cpu", 2),  # no more workers than idle cores
        (2, 8, "cpu", 2),  # no more workers than models (each gets 4 torch threads)
        (1, 8, "cpu", 0),  # one model to train (the other cached): in-process, with every core
        (2, 1, "cpu", 0),  # a busy machine: one after the other
        (2, 8, "cuda", 0),  # one accelerator is shared, not split
    ],
)
def test_auto_runner_fans_out_only_where_it_pays(pending, idle_cpus, device, workers):
    from flows.jobs import parallel_workers

    assert parallel_workers(pending, idle_cpus, device) == workers


@pytest.mark.slow  # end to end, in the slow suite (the fast suite's 10-minute budget)
def test_train_base_models_on_dask_two_workers(
    prefect_harness, dask_home, tmp_path, tiny_config_file, monkeypatch
):
    from flows.pipeline import train_base_models
    from flows.registry import list_models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # before the cluster starts: its workers inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
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
    # The nanny set its workers' thread counts (1) here too; the flow put them back, so the stages after the
    # fan-out (the sweep) keep the caller's threads.
    assert os.environ.get("OMP_NUM_THREADS") == "2" and "MKL_NUM_THREADS" not in os.environ
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
