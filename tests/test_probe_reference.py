"""Cheap checks before expensive work: a home the OS will not let us write fails before any pretraining, and
base models whose card says they were trained on another reference are refused before the config's reference
is pretrained."""

import sys
from pathlib import Path

import pytest

from training.models import HomeError

UNWRITABLE_HOME = Path("/proc/self/msdda_home")  # cannot be created, not even by root
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")


def _no_training(*args, **kwargs):
    raise AssertionError("trained before finding the home unwritable")


def _cli(args: list[str], capfd) -> tuple[int, str, str]:
    from flows.cli import main

    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


@linux_only
@pytest.mark.parametrize("build", ["reference", "evaluator CNN"])
def test_an_unwritable_home_fails_before_any_training(tiny_config, monkeypatch, build):
    """It used to train the evaluator CNN (minutes for the default config) and then fail to save it."""
    from training import embedded

    monkeypatch.setattr(embedded, "train_classifier", _no_training)
    monkeypatch.setattr(embedded, "train_vae", _no_training)
    with pytest.raises(HomeError) as info:
        if build == "reference":
            embedded.pretrain_reference(tiny_config, UNWRITABLE_HOME, progress=False)
        else:
            embedded.digit_classifier(tiny_config, UNWRITABLE_HOME, progress=False)
    message = str(info.value)
    assert f"cannot write to {UNWRITABLE_HOME}/" in message and "set MSDDA_HOME" in message, message
    assert "\n" not in message


@linux_only
def test_pretrain_into_an_unwritable_home_is_one_line(tiny_config_file, capfd, monkeypatch):
    from training import embedded

    monkeypatch.setattr(embedded, "train_classifier", _no_training)
    monkeypatch.setenv("MSDDA_HOME", str(UNWRITABLE_HOME))
    code, out, err = _cli(["pretrain", "--config", str(tiny_config_file), "--json"], capfd)
    assert code == 2 and out == "", err
    assert err.startswith("error: cannot write to /proc/") and "/msdda_home/reference (" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
