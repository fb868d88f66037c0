"""The CLI's options and its bad-input contract: one line `error: ...` on stderr, exit code 2, no traceback,
nothing written (fresh MSDDA_HOME and MLflow store stay absent). In-process through ``flows.cli.main`` (fast:
every case fails before any model work), plus one real console-script process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tests.helpers import msdda_main, run_msdda

MODEL_COMMANDS = ("pretrain", "train", "compose", "sweep", "run", "deploy")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh MSDDA_HOME (MLflow's default store lives in it) and Prefect home, both still absent."""
    home = tmp_path / "home"
    monkeypatch.setenv("MSDDA_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # help tables on one line each
    return home


def assert_one_line_error(code: int, out: str, err: str, message: str, home: Path) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err, err
    assert "Traceback" not in err and out == ""
    assert not home.exists(), "nothing is written on bad input"


def test_help_lists_the_choices(fresh, capfd):
    from composition.methods import METHODS
    from training.rewards import REWARDS

    code, out, _ = msdda_main(["compose", "--help"], capfd)
    assert code == 0 and f"<{'|'.join(METHODS)}>" in out, out
    code, out, _ = msdda_main(["train", "--help"], capfd)
    assert code == 0 and f"<{'|'.join(REWARDS)}>" in out, out
    code, out, _ = msdda_main(["run", "--help"], capfd)
    assert code == 0 and "<auto|sequential|dask>" in out
    for command in MODEL_COMMANDS:
        code, out, _ = msdda_main([command, "--help"], capfd)
        assert code == 0 and "<auto|cpu|cuda>" in out and "--set" in out, (command, out)
    code, out, _ = msdda_main([], capfd)
    assert code == 0 and "compose" in out, "bare `msdda` shows the help"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # train
        (["train", "-o", "nope"], "'nope' is not one of 'digit_alignment', 'ink_economy'"),
        (["train", "-o", "ink_economy", "--set", "train.iterations=abc"], "--set train.iterations=abc: "),
        (["train", "-o", "ink_economy", "--set", "train.iterationz=3"], "train.iterationz: unknown field"),
        (["train", "-o", "ink_economy", "--set", "train.iterations"], "expected section.field=value"),
        (["train", "-o", "ink_economy", "--config", "MISSING"], "cannot read config"),
        (["train", "-o", "ink_economy", "--config", "DIRECTORY"], "cannot read config"),
        (["train", "-o", "ink_economy", "--config", "INVALID"], "train.iterations: Input should be"),
        (["train", "-o", "ink_economy", "--config", "NOT_YAML"], "not valid YAML"),
        (["train", "-o", "ink_economy", "--config", "DEEP_LISTS"], "nested too deeply to read"),
        (["train", "-o", "ink_economy", "--config", "DEEP_MAPPINGS"], "nested too deeply to read"),
        pytest.param(
            ["train", "-o", "ink_economy", "--set", "train.prompts=" + "[" * 3000 + "]" * 3000],
            "--set train.prompts=...: the value is nested too deeply to read",
            id="deep-set",
        ),
        pytest.param(["train", "-o", "ink_economy", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
        (["train", "-o", "ink_economy", "--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
        # sweep
        (["sweep", "--grid", "1"], "Invalid value for '--grid'"),
        (["sweep", "--grid", "abc"], "Invalid value for '--grid'"),
        (["sweep", "--methods", "msdda,magic"], "unknown method 'magic'; choose from msdda, db"),
        (["sweep", "--set", "composition.grid=1"], "--set composition.grid=1: composition.grid:"),
        # compose
        (["compose", "-w", "0.5,0.5", "--prompts-file", "EMPTY"], "no prompts"),
        (["compose", "-w", "0.5,0.5", "--prompts-file", "MISSING"], "cannot read prompts"),
        (["compose", "-w", "0.5,0.5", "--prompt", " "], "prompts must be non-empty text"),
        pytest.param(
            ["compose", "-w", "0.5,0.5", "--prompt", "seven", "--prompt", "7" * 2001],
            "prompt 2 ('" + "7" * 24 + "'...) is 2,001 characters long; a prompt takes at most 2,000",
            id="long-prompt",
        ),
        (["compose", "-w", "0.5,0.5", "--prompts-file", "LONG_LINE"], "is 5,000,000 characters long"),
        (["compose", "-w", "0.5,0.5", "-c", "LONG_CONFIG"], "train.prompts.0: String should have at most"),
        pytest.param(
            ["compose", "-w", "0.5,0.5", "--set", f"train.prompts=[{'x' * 2001}]"],
            "train.prompts.0: String should have at most 2000 characters",
            id="long-prompt-set",
        ),
        (["compose", "-w", "0.5,0.5", "--set", "composition.seed=x"], "--set composition.seed=x:"),
        (["compose", "-w", "0.5,0.5", "--method", "magic"], "'magic' is not one of 'msdda', 'db'"),
        (["compose", "-w", "0.5,0.5", "-m", ",,"], "--models names nothing"),  # was: the default models
        (["sweep", "--methods", " , "], "--methods names nothing"),
        pytest.param(["compose", "-w", "0.5,0.5", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
        # pretrain, run, deploy
        (["pretrain", "--set", "pretrain.unet_steps=0"], "pretrain.unet_steps: Input should be greater"),
        (["run", "--runner", "threads"], "'threads' is not one of 'auto', 'sequential', 'dask'"),
        pytest.param(["run", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
        (["run", "--set", "runtime.device=cuda", "--device", "tpu"], "'tpu' is not one of"),
        (["deploy", "--cron", "61 * * * *"], "invalid cron schedule '61 * * * *'"),
        (["deploy", "--set", "objectives=3"], "--set objectives=3: objectives: Input should be a valid list"),
        pytest.param(["deploy", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(fresh, tmp_path, capfd, args, message):
    files = {
        "MISSING": str(tmp_path / "missing.txt"),
        "DIRECTORY": str(tmp_path),
        "INVALID": _write(tmp_path / "invalid.yaml", "train:\n  iterations: many\n"),
        "NOT_YAML": _write(tmp_path / "not_yaml.yaml", "train: [oops\n"),
        "DEEP_LISTS": _write(tmp_path / "deep.yaml", "train:\n  prompts: " + "[" * 3000 + "]" * 3000),
        "DEEP_MAPPINGS": _write(tmp_path / "deep_maps.yaml", "a: " + "{b: " * 3000 + "1" + "}" * 3000),
        "EMPTY": _write(tmp_path / "empty.txt", "\n  \n\n"),
        "LONG_LINE": _write(tmp_path / "long.txt", "a seven\n" + "7" * 5_000_000 + "\n"),
        "LONG_CONFIG": _write(tmp_path / "long.yaml", f"train:\n  prompts: ['{'7' * 5000}']\n"),
    }
    code, out, err = msdda_main([files.get(a, a) for a in args], capfd)
    assert_one_line_error(code, out, err, message, fresh)


@NO_CUDA
def test_set_runtime_device_is_checked_like_device(fresh, capfd):
    code, out, err = msdda_main(["sweep", "--set", "runtime.device=cuda"], capfd)
    assert_one_line_error(code, out, err, "no CUDA device", fresh)
    code, out, err = msdda_main(["sweep", "--set", "runtime.device=cuda", "--device", "cuda"], capfd)
    assert_one_line_error(code, out, err, "no CUDA device", fresh)


def test_deploy_to_a_silent_server_gives_up_quickly(fresh, monkeypatch, capfd):
    """A Prefect server that accepts the connection but never answers: one line after the short health-check
    timeout (here 0.5 s), without Prefect's retries."""
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.prefect_api

    monkeypatch.setattr(flows.prefect_api, "HEALTHCHECK_SECONDS", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        start = time.monotonic()
        with temporary_settings(updates={PREFECT_API_URL: url}):
            code, out, err = msdda_main(["deploy"], capfd)
        seconds = time.monotonic() - start
    assert_one_line_error(
        code, out, err, f"Prefect server at {url} is unreachable: no answer within 0.5 s", fresh
    )
    assert seconds < 10, seconds


def test_console_script_process(tmp_path):
    """The same contract through a real `python -m flows.cli` process running this worktree's code."""
    result = run_msdda(
        ["train", "-o", "ink_economy", "--set", "train.iterations=abc"],
        tmp_path,
        tmp_path / "home",
        timeout=120,
        without_prefixes=("MLFLOW_", "PREFECT_API"),
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --set train.iterations=abc: train.iterations: Input should be")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "home").exists()
