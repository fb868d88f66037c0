"""`msdda models`, `compose` and `sweep` as a user runs them (real subprocesses, real MLflow on SQLite), and
the bad-input contract: one line on stderr, exit code 2, no traceback, the registry unchanged."""

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import free_port, run_msdda
from training.card import CARD_FILE


@pytest.fixture
def registry(tiny_registry):
    return tiny_registry


def msdda(args, registry, tmp_path, config_file, **env):
    """`msdda ARGS [--config CONFIG_FILE]` (``run_msdda``) on ``registry``'s home and store."""
    config = [] if args[0] == "models" else ["--config", str(config_file)]
    settings = {"MLFLOW_TRACKING_URI": registry["uri"], **env}
    return run_msdda([*args, *config], tmp_path, registry["home"], **settings)


def models_listing(registry):
    from flows.registry import list_models

    return list_models(registry["home"])


def test_models_compose_and_sweep(registry, tmp_path, tiny_config_file):
    listed = msdda(["models", "--json"], registry, tmp_path, tiny_config_file)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["models"]
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [
        ("msdda-digit_alignment", 1, ["champion"]),
        ("msdda-ink_economy", 1, ["champion"]),
    ]

    out = tmp_path / "images"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("handwritten three\n\n  a handwritten digit seven  \n")
    composed = msdda(
        ["compose", "--weights", "0.3,0.7", "--num-images", "4", "--seed", "3", "--out", str(out), "--json"]
        + ["--prompt", "a handwritten digit one", "--prompts-file", str(prompts_file)],
        registry,
        tmp_path,
        tiny_config_file,
    )
    assert composed.returncode == 0, composed.stderr
    payload = json.loads(composed.stdout)
    prompts = ["a handwritten digit one", "handwritten three", "a handwritten digit seven"]
    assert payload["prompts"] == prompts
    manifest = json.loads((out / "manifest.json").read_text())
    assert [image["prompt"] for image in manifest["images"]] == [*prompts, prompts[0]], "cycled"
    assert "compose: msdda" not in composed.stderr, "no bar under --json when stderr is not a tty"
    assert set(payload["rewards"]) == {"digit_alignment", "ink_economy"}
    assert payload["nfe"] == 2 * 4 and payload["image_dir"] == str(out)
    assert len(list(out.glob("*.png"))) == 4 + 1  # the images and their grid
    from PIL import Image

    assert Image.open(out / "0000.png").size == (16, 16)  # each image as sampled
    assert Image.open(out / "grid.png").width >= 4 * 96  # upscaled and labelled (tests/test_grids.py)
    assert [m["version"] for m in payload["models"]] == [1, 1]

    import mlflow

    run = mlflow.MlflowClient(registry["uri"]).get_run(payload["mlflow_run_id"])
    assert run.data.params["weights"] == "0.3,0.7" and run.data.params["method"] == "msdda"
    assert run.info.run_name == "compose w=0.3,0.7 msdda"
    assert run.data.params["models"] == "msdda-digit_alignment/1,msdda-ink_economy/1"
    assert run.data.metrics["nfe"] == 8 and "reward_ink_economy" in run.data.metrics
    assert json.loads(run.data.params["prompts"]) == prompts and run.data.params["num_prompts"] == "3"

    shown = msdda(
        ["compose", "--weights", "0.3,0.7", "-n", "2", "--out", str(tmp_path / "bar")],
        registry,
        tmp_path,
        tiny_config_file,
    )
    assert shown.returncode == 0, shown.stderr
    assert "compose: msdda" in shown.stderr and "2/2" in shown.stderr, "a progress bar without --json"

    swept = msdda(
        ["sweep", "--methods", "msdda,rs", "--grid", "3", "--num-images", "4", "--json"],
        registry,
        tmp_path,
        tiny_config_file,
    )
    assert swept.returncode == 0, swept.stderr
    result = json.loads(swept.stdout)
    assert set(result["methods"]) == {"msdda", "rs"} and result["cached"] is False
    assert [p["weights"] for p in result["methods"]["msdda"]["points"]] == [
        [0.0, 1.0],
        [0.5, 0.5],
        [1.0, 0.0],
    ]
    assert Path(result["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert (Path(result["out_dir"]) / "grids" / "rs" / "w0.5_0.5.png").exists()
    assert Image.open(Path(result["out_dir"]) / "grids" / "msdda.png").height > 3 * 96  # a row per weight
    assert (Path(result["out_dir"]) / "fronts" / "msdda.png").exists()
    again = msdda(
        ["sweep", "--methods", "msdda,rs", "--grid", "3", "--num-images", "4", "--json"],
        registry,
        tmp_path,
        tiny_config_file,
    )
    assert json.loads(again.stdout)["cached"] is True
    assert json.loads(again.stdout)["methods"] == result["methods"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "0.3,abc"], "not a comma-separated list of numbers"),
        (["--weights", "nan,0.5"], "must be finite"),
        (["--weights", "0.2,0.3,0.5"], "3 weights given for 2 base models"),
        (["--weights", "0.5,0.5", "--models", "nosuch,ink_economy"], "unknown model 'msdda-nosuch'"),
        (["--weights", "0.5,0.5", "--models", "ink_economy@gold,digit_alignment"], "has no alias 'gold'"),
        (["--weights", "0.5,0.5", "--method", "magic"], "'magic' is not one of 'msdda', 'db'"),
        (["--weights", "0.5,0.5", "--prompt", "a cat"], "needs a prompt that names a digit, got 'a cat'"),
        (["--weights", "0.5,0.5", "--prompts-file", "EMPTY"], "no prompts"),
        (["--weights", "-40,40", "--models", "PATHS"], "precision is not positive"),
        (["--weights", "0.5,0.5", "--models", "MISMATCHED"], "different reference models"),
    ],
)
def test_bad_compose_input_is_one_line_and_changes_nothing(
    registry, tmp_path, tiny_config_file, tiny_base_models, args, message, monkeypatch, capfd
):
    if "PATHS" in args or "MISMATCHED" in args:
        second = tiny_base_models[1]
        if "MISMATCHED" in args:
            second = tmp_path / "other"
            shutil.copytree(tiny_base_models[1], second)
            meta = json.loads((second / CARD_FILE).read_text())
            (second / CARD_FILE).write_text(json.dumps({**meta, "reference_hash": "f" * 64}))
        args = [a if a not in ("PATHS", "MISMATCHED") else f"{tiny_base_models[0]},{second}" for a in args]
    if "EMPTY" in args:
        (tmp_path / "empty.txt").write_text("\n \n")
        args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    from flows.cli import main

    before = models_listing(registry)
    runs = _compose_runs(registry)
    monkeypatch.setenv("MSDDA_HOME", str(registry["home"]))
    capfd.readouterr()
    # in-process: fast; --json: a failure while sampling (a non-positive precision) comes after the progress
    # bar, which --json leaves off when stderr is not a terminal
    code = main(["compose", *args, "--num-images", "2", "--config", str(tiny_config_file), "--json"])
    out, err = capfd.readouterr()
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err and "Traceback" not in err and out == ""
    assert models_listing(registry) == before
    assert _compose_runs(registry) == runs, "no MLflow run logged"


def _compose_runs(registry) -> int:
    import mlflow

    client = mlflow.MlflowClient(registry["uri"])
    experiment = client.get_experiment_by_name("msdda")
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


def test_bad_weights_through_the_console_script(registry, tmp_path, tiny_config_file):
    """The same contract through a real `python -m flows.cli` process."""
    result = msdda(["compose", "--weights", "0.2,0.3,0.5"], registry, tmp_path, tiny_config_file)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: 3 weights given for 2 base models\n"


def test_unreachable_tracking_server_is_one_line(registry, tmp_path, tiny_config_file):
    port = free_port()
    for args in (["models"], ["compose", "--weights", "0.5,0.5"]):
        result = msdda(
            args, registry, tmp_path, tiny_config_file, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"
        )
        assert result.returncode == 2 and "unreachable" in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
