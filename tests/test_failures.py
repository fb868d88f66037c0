"""Every failure is one line on stderr with a non-zero exit: bad input (exit 2), operational failures an
operator can act on, and unexpected ones (exit 1, the traceback in a log file; ``--verbose`` or
``MSDDA_DEBUG=1`` shows it inline). And torch's thread count follows the machine and the config."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flows.cli import main
from tests.helpers import REPO


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def test_config_that_is_not_utf8_text(tmp_path, capsys):
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"objectives:\n  - \xff\xfe\x00digit_alignment\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(config) in line and "UTF-8" in line


def test_home_that_is_a_file(tmp_path, monkeypatch, capsys):
    home = tmp_path / "not_a_folder"
    home.write_text("the user's file")
    monkeypatch.setenv("MSDDA_HOME", str(home))
    assert main(["models"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "MSDDA_HOME" in line and "is a file" in line
    assert home.read_text() == "the user's file"


def _crash(*args, **kwargs):
    raise RuntimeError("an unforeseen failure\nwith a second line")


def test_unexpected_failure_is_one_line_and_a_log(monkeypatch, capsys, tiny_config_file):
    import flows.jobs

    monkeypatch.setattr(flows.jobs, "compose_job", _crash)
    assert main(["compose", "-w", "0.5,0.5", "-c", str(tiny_config_file)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: RuntimeError: an unforeseen failure (traceback: ")
    log = Path(line.removesuffix(")").rsplit("traceback: ", 1)[1])
    assert log.parent == Path(os.environ["MSDDA_HOME"]).resolve() / "logs"
    text = log.read_text()
    assert "Traceback" in text and "with a second line" in text and "compose -w 0.5,0.5" in text


@pytest.mark.parametrize("how", ["--verbose", "MSDDA_DEBUG"])
def test_verbose_shows_the_traceback(how, monkeypatch, capsys, tiny_config_file):
    import flows.jobs

    monkeypatch.setattr(flows.jobs, "compose_job", _crash)
    args = ["compose", "-w", "0.5,0.5", "-c", str(tiny_config_file)]
    if how == "--verbose":
        args = ["--verbose", *args]
    else:
        monkeypatch.setenv("MSDDA_DEBUG", "1")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "_crash" in err
    assert err.rstrip().splitlines()[-1] == "error: RuntimeError: an unforeseen failure"


def test_full_disk_is_named(capsys):
    """A real ENOSPC (``/dev/full`` refuses every write) becomes one line that says so."""
    from flows.failures import report_failure

    try:
        with open("/dev/full", "w") as handle:
            handle.write("x")
    except OSError as exc:
        failure = exc
    assert report_failure(failure, ["train"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left on the device" in line


def test_locked_and_corrupt_sqlite_are_named(tmp_path, capsys):
    from flows.failures import report_failure

    database = tmp_path / "store.db"
    holder = sqlite3.connect(database, timeout=0)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    try:
        sqlite3.connect(database, timeout=0).execute("select * from t")
    except sqlite3.OperationalError as exc:
        locked = exc
    finally:
        holder.rollback()
        holder.close()
    corrupt_file = tmp_path / "corrupt.db"
    corrupt_file.write_bytes(b"this is not a database" * 100)
    try:
        sqlite3.connect(corrupt_file).execute("select * from sqlite_master")
    except sqlite3.DatabaseError as exc:
        corrupt = exc
    report_failure(RuntimeError("outer"), ["models"])  # its cause chain is empty: the generic line
    assert "RuntimeError: outer" in _one_error_line(capsys.readouterr().err)
    for failure, words in ((locked, "is locked"), (corrupt, "is corrupt")):
        wrapped = RuntimeError("while logging")
        wrapped.__cause__ = failure
        assert report_failure(wrapped, ["models"]) == 1
        assert words in _one_error_line(capsys.readouterr().err)


def test_error_starts_on_its_own_line_after_a_progress_bar(capsys):
    """A failure inside a loop with a progress bar: the error line is not glued to the bar's last line."""
    from tqdm.auto import tqdm

    from flows.failures import report_failure

    def work():
        for step in tqdm(range(10), desc="pretrain: denoiser"):
            if step == 3:
                raise ValueError("boom")

    try:
        work()
    except ValueError as exc:
        failure = exc
    report_failure(failure, ["pretrain"])
    err = capsys.readouterr().err
    assert "\nerror: ValueError: boom" in err


def test_threads_follow_the_config_and_the_machine(monkeypatch):
    from training.device import configure_threads, free_cpus, usable_cpus

    assert usable_cpus() == os.sched_getaffinity(0)
    assert configure_threads(1) == torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads(0) == 3
    assert configure_threads(2) == 2  # the config wins over the environment
    monkeypatch.delenv("OMP_NUM_THREADS")
    free_cpus.cache_clear()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in usable_cpus()]
    try:
        time.sleep(0.5)
        assert configure_threads(0) == 1  # every CPU busy with other work: one thread
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        assert configure_threads(0) == 1  # decided once per process
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        free_cpus.cache_clear()


def test_old_pretrain_num_threads_moves_to_runtime():
    from configs import parse_config

    config = parse_config({"pretrain": {"num_threads": 1}})
    assert config.runtime.num_threads == 1
    assert parse_config({}).runtime.num_threads == 0


def test_prefect_console_logs_no_traceback(tmp_path):
    """A failed flow run's error log shows its message's first line on Prefect's console handler, and the log
    file that holds its traceback; other handlers of the same record still get the traceback."""
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.failures import command_logging, console_without_tracebacks

    console, full = io.StringIO(), io.StringIO()
    logger = logging.getLogger("tests.prefect_console")
    logger.propagate = False
    logger.handlers = [PrefectConsoleHandler(stream=console), logging.StreamHandler(full)]
    console_without_tracebacks()
    with command_logging(verbose=False):
        try:
            raise RuntimeError("inside a flow")
        except RuntimeError:
            logger.exception("Encountered exception during execution\nsecond line")
    assert "Encountered exception during execution (traceback: " in console.getvalue()
    assert "Traceback" not in console.getvalue() and "second line" not in console.getvalue()
    log = Path(console.getvalue().strip().rsplit("traceback: ", 1)[1].removesuffix(")"))
    assert "Traceback" in log.read_text() and "inside a flow" in log.read_text()
    assert "Traceback" in full.getvalue() and "inside a flow" in full.getvalue()


@pytest.mark.slow
def test_run_failing_inside_the_flow_is_one_line(monkeypatch, capfd, trained_home, tiny_config_file):
    """``msdda run`` whose sweep fails inside its Prefect flow: one line, no traceback from Prefect's log.
    (The base models come from the cache: the failure is in the sweep.)"""
    import flows.jobs

    monkeypatch.setattr(flows.jobs, "sweep_job", _crash)
    assert main(["run", "-c", str(tiny_config_file)]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert "error: RuntimeError: an unforeseen failure (traceback: " in err


SAFETENSORS_DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What safetensors 0.8 raises when its (Rust) writer meets a full disk: the ``errno`` only in the text."""


def test_disk_full_in_a_library_message_is_named(tmp_path, capsys):
    """safetensors' and SQLite's disk-full errors carry no ``errno``: their text says it. Both are the
    disk-full line with its remedy, not "a weights file is corrupt" nor a bare exception name."""
    from safetensors import SafetensorError

    from flows.failures import report_failure

    database = sqlite3.connect(tmp_path / "small.db")
    database.execute("pragma max_page_count = 2")  # SQLite's own SQLITE_FULL, as on a full disk
    try:
        database.execute("create table t (x)")
        database.executemany("insert into t values (?)", [("x" * 1000,)] * 100)
    except sqlite3.OperationalError as exc:
        sqlite_full = exc
    finally:
        database.close()
    rust = SafetensorError(SAFETENSORS_DISK_FULL)
    read_only = SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    for failure, words in (
        (rust, "no space left on the device"),
        (sqlite_full, "no space left on the device"),
        (read_only, "the file system is read-only"),
    ):
        assert report_failure(failure, ["train"]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert words in line and "run the command again" in line, line
        assert "corrupt" not in line
    corrupt = SafetensorError("Error while deserializing header: header too large")
    report_failure(corrupt, ["train"])
    assert "a weights file is corrupt or truncated" in _one_error_line(capsys.readouterr().err)


_IN_A_TINY_FILESYSTEM = """
import sys, torch
from safetensors.torch import save_file
from flows.failures import report_failure
try:
    save_file({"w": torch.zeros(100_000)}, sys.argv[1] + "/weights.safetensors")
except Exception as exc:
    sys.exit(report_failure(exc, ["train"]))
"""


@pytest.mark.parametrize("mount", ["size=16k", "ro"])
def test_safetensors_on_a_full_or_read_only_filesystem(mount, tmp_path):
    """The real error: safetensors saves to a 16 KiB (or a read-only) tmpfs, mounted in a user and mount
    namespace of its own (no root needed; gone with the process)."""
    folder = tmp_path / "tiny_fs"
    folder.mkdir()
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    try:
        probe = subprocess.run([*namespace, "true"], capture_output=True, timeout=30, check=False)
    except FileNotFoundError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unshare, or user namespaces are off")
    script = f'mount -t tmpfs -o {mount} none "$1" && exec "$2" -c "$3" "$1"'
    done = subprocess.run(
        [*namespace, "sh", "-c", script, "sh", str(folder), sys.executable, _IN_A_TINY_FILESYSTEM],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    line = _one_error_line(done.stderr)
    expected = "no space left on the device" if mount.startswith("size") else "the file system is read-only"
    assert expected in line and "os error" in line, line


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("args", "module", "name"),
    [
        (["pretrain"], "training.reference.loader", "pretrain_reference"),
        (["train", "-o", "ink_economy"], "flows.jobs", "train_job"),
        (["compose", "-w", "0.5,0.5"], "flows.jobs", "compose_job"),
        (["models"], "flows.registry", "list_models"),
    ],
)
def test_ctrl_c_is_aborted_and_exit_130(args, module, name, monkeypatch, capfd, tiny_config_file):
    """docs/operations.md: Ctrl-C prints ``Aborted!`` and exits with 130, no traceback, in every command
    (typer's own handling exited 130 without a word)."""
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name, _interrupt)
    config = [] if args == ["models"] else ["-c", str(tiny_config_file)]
    capfd.readouterr()
    assert main([*args, *config]) == 130
    out, err = capfd.readouterr()
    assert err == "Aborted!\n" and out == ""


def test_sigint_to_a_waiting_command(tmp_path):
    """A real SIGINT to an ``msdda compose`` process waiting to read its prompts (a named pipe no one writes
    yet): ``Aborted!``, exit code 130, nothing else on stderr."""
    import errno
    import signal

    prompts = tmp_path / "prompts"
    os.mkfifo(prompts)
    command = [sys.executable, "-m", "flows.cli", "compose", "-w", "0.5,0.5", "--prompts-file", str(prompts)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    writer = None
    try:
        deadline = time.monotonic() + 240
        while writer is None:  # opens once the command has the pipe open for reading: it then waits in read
            try:
                writer = os.open(prompts, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO and process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the command never opened its prompts file"
                time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
        if writer is not None:
            os.close(writer)
    assert process.returncode == 130, err
    assert err == "Aborted!\n" and out == ""
