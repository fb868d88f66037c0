"""The `msdda` console script, run as a user would (a real subprocess)."""

import json
from pathlib import Path

import pytest

from tests.helpers import run_msdda, run_python, subprocess_env


def test_pretrain_json_then_cached(tmp_path, tiny_config_file):
    home = tmp_path / "home"
    first = run_msdda(["pretrain", "--config", str(tiny_config_file), "--json"], tmp_path, home)
    assert first.returncode == 0, first.stderr
    payload = json.loads(first.stdout)
    assert {"path", "alignment_accuracy", "seconds"} <= payload.keys()
    assert payload["cached"] is False and Path(payload["path"]).is_relative_to(home)
    second = run_msdda(["pretrain", "--config", str(tiny_config_file), "--json"], tmp_path, home)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["cached"] is True and again["path"] == payload["path"]
    assert again["alignment_accuracy"] == payload["alignment_accuracy"]
    assert not (tmp_path / ".msdda").exists(), "MSDDA_HOME is honoured"


@pytest.mark.slow  # the whole main job, twice: about 80 s, beyond the fast suite's budget
def test_run_is_the_whole_pipeline_and_is_cached(tiny_run):
    """`msdda run` (the Prefect flow `msdda-pipeline`, ephemeral mode): pretrain (here: the cached reference),
    train, register, sweep; run again with `--set ... --device cpu`: the base models come from the cache and
    the overrides reach the sweep's flow. The first run is the session's ``tiny_run`` (as on a user's machine:
    no CI marker, which quiets Prefect's SDK, and no telemetry settings of ours), which other tests share."""
    home, root, tiny_config_file = tiny_run.home, tiny_run.root, tiny_run.config
    first = tiny_run.result
    assert first.returncode == 0, first.stderr[-3000:]
    # a clean, private first run: Prefect's temporary server sends no telemetry (whose heartbeat also raised
    # `database is locked` tracebacks), and nothing else prints a traceback or an ERROR line; runs have names
    # that say what they do
    for noise in ("Traceback", "telemetry", "| ERROR"):
        assert noise not in first.stderr, first.stderr[-3000:]
    names = _run_names(tiny_run.prefect_home)
    assert names >= {
        "msdda run (auto)",
        "pretrain reference",
        "train base models: default (auto)",
        "train digit_alignment",
        "train ink_economy",
        "sweep methods=default grid=default",
    }, names
    assert _mlflow_run_names(home) >= {
        "train digit_alignment beta=0.01",
        "train ink_economy beta=0.01",
        "sweep 3x5",  # 3 weight vectors x 5 methods
    }
    payload = json.loads(first.stdout)
    assert payload["reference"]["cached"] is True and Path(payload["reference"]["path"]).is_relative_to(home)
    assert set(payload["base_models"]) == {"digit_alignment", "ink_economy"}
    for model in payload["base_models"].values():
        registered = model["registered"]
        assert registered["name"] == f"msdda-{model['objective']}" and registered["version"] == 1
    sweep = payload["sweep"]
    assert set(sweep["methods"]) == {"msdda", "db", "rs", "code", "rgg"} and sweep["cached"] is False
    assert all(len(m["points"]) == 3 for m in sweep["methods"].values())
    assert Path(sweep["plot"]).is_file() and Path(sweep["plot"]).is_relative_to(home)

    # again, with overrides for the sweep (they reach its flow, which loads the config again from its path):
    # the base models come from the cache and are not registered again
    overrides = ["--set", "composition.methods=[msdda]", "--set", "composition.grid=2", "--device", "cpu"]
    second = run_msdda(["run", "--config", str(tiny_config_file), *overrides, "--json"], root, home)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert (
        list(again["sweep"]["methods"]) == ["msdda"]
        and len(again["sweep"]["methods"]["msdda"]["points"]) == 2
    )
    assert all(m["cached"] for m in again["base_models"].values())
    assert all(not m["registered"]["created"] for m in again["base_models"].values()), "no duplicate versions"
    assert not (root / ".msdda").exists()


def _mlflow_run_names(home: Path) -> set[str]:
    """The names of the MLflow runs in ``home``'s store."""
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(home))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {run.info.run_name for run in client.search_runs(experiments)}


def _run_names(prefect_home: Path) -> set[str]:
    """The names of the flow and task runs recorded in ``prefect_home``'s database, read back through
    Prefect's own client."""
    from flows.prefect_api import STARTUP_TIMEOUT_SECONDS, STARTUP_TIMEOUT_SETTING

    script = (
        "import asyncio, json\n"
        "from prefect import get_client\n"
        "async def names():\n"
        "    async with get_client() as client:\n"
        "        runs = [*await client.read_flow_runs(), *await client.read_task_runs()]\n"
        "        return [run.name for run in runs]\n"
        "print(json.dumps(asyncio.run(names())))\n"
    )
    env = subprocess_env(
        PREFECT_HOME=prefect_home, DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    # Prefect's own client starts the temporary server here: with msdda's startup timeout, not its 20 s
    env.setdefault(STARTUP_TIMEOUT_SETTING, str(STARTUP_TIMEOUT_SECONDS))
    result = run_python(["-c", script], env)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ("pretrain:\n  unet_stepz: 3\n", "pretrain.unet_stepz: unknown field"),
        ("model: [oops\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, config_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(config_text)
    result = run_msdda(["pretrain", "--config", str(path)], tmp_path, tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "home").exists(), "nothing is written on bad input"


def test_missing_checkpoint_is_one_line_exit_2(tmp_path):
    path = tmp_path / "sd.yaml"
    path.write_text(f"model:\n  source: pretrained\n  pretrained: {tmp_path / 'no_such_model'}\n")
    result = run_msdda(["run", "--config", str(path)], tmp_path, tmp_path / "home")
    assert result.returncode == 2
    assert "no_such_model" in result.stderr and result.stderr.strip().count("\n") == 0


def test_unknown_option_exits_2(tmp_path):
    result = run_msdda(["pretrain", "--bogus"], tmp_path, tmp_path / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_methods_lists_the_registry_and_compose_refuses_other_names(tmp_path):
    from composition.methods import METHODS

    result = run_msdda(["methods", "--json"], tmp_path, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list(METHODS)
    assert {row["kind"] for row in rows} == {"kernel", "search"}
    bad = run_msdda(["compose", "--method", "nope", "-w", "0.5,0.5"], tmp_path, tmp_path / "home")
    choices = ", ".join(repr(name) for name in METHODS)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: Invalid value for '--method': 'nope' is not one of {choices}. (see 'msdda compose --help')"
    ]


def test_version_and_every_option_has_help(tmp_path):
    import typer

    from flows.cli import app

    result = run_msdda(["--version"], tmp_path, tmp_path / "home")
    assert result.returncode == 0 and result.stdout.strip() == "msdda 0.1.0", result.stderr
    group = typer.main.get_command(app)
    undocumented = [
        f"{name} {param.opts[0]}"
        for name, command in group.commands.items()
        for param in command.params
        if param.param_type_name == "option" and not (param.help or "").strip()
    ]
    assert group.commands and not undocumented, undocumented
