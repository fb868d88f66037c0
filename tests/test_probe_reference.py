"""Cheap checks before expensive work: a home the OS will not let us write fails before any pretraining, and
base models whose card says they were trained on another reference are refused before the config's reference
is pretrained."""

import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, msdda_main
from training.storage import HomeError

UNWRITABLE_HOME = Path("/proc/self/msdda_home")  # cannot be created, not even by root
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")


def _no_training(*args, **kwargs):
    raise AssertionError("trained before a cheap check refused")


@linux_only
@pytest.mark.parametrize("build", ["reference", "evaluator CNN"])
def test_an_unwritable_home_fails_before_any_training(tiny_config, monkeypatch, build):
    """It used to train the evaluator CNN (minutes for the default config) and then fail to save it."""
    from training.reference import embedded

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
    from training.reference import embedded

    monkeypatch.setattr(embedded, "train_classifier", _no_training)
    monkeypatch.setenv("MSDDA_HOME", str(UNWRITABLE_HOME))
    code, out, err = msdda_main(["pretrain", "--config", str(tiny_config_file), "--json"], capfd)
    assert code == 2 and out == "", err
    assert err.startswith("error: cannot write to /proc/") and "/msdda_home/reference (" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------ the card's reference, before pretraining


def _trained_on(folders: list[Path], tmp_path: Path, reference: dict, reference_hash: str | None = None):
    """Copies of the base models in ``folders`` whose cards record ``reference`` (the ``model`` section of
    the config they were trained with) and, when given, ``reference_hash``."""
    import json
    import shutil

    from training.card import CARD_FILE

    copies = []
    for folder in folders:
        copy = shutil.copytree(folder, tmp_path / "models" / folder.name)
        card = json.loads((copy / CARD_FILE).read_text())
        card["reference"] = reference
        card["reference_hash"] = reference_hash or card["reference_hash"]
        (copy / CARD_FILE).write_text(json.dumps(card))
        copies.append(copy)
    return copies


def _default_config():
    import yaml

    from configs import parse_config

    path = REPO / "configs" / "default.yaml"
    return parse_config(yaml.safe_load(path.read_text()), str(path))


def test_models_of_another_embedded_architecture_are_refused_before_pretraining(
    tiny_config, tiny_base_models, tmp_path, monkeypatch
):
    """It used to pretrain the default reference (minutes) and then fail the lineage check."""
    from composition.engine import CompositionError, load_ensemble
    from training.reference import embedded

    monkeypatch.setattr(embedded, "train_classifier", _no_training)
    monkeypatch.setattr(embedded, "train_vae", _no_training)
    folders = _trained_on(tiny_base_models, tmp_path, tiny_config.model.model_dump(mode="json"))
    with pytest.raises(CompositionError) as info:
        load_ensemble(_default_config(), tmp_path / "home", folders)
    message = str(info.value)
    assert f"({folders[0]}) was trained on an embedded reference with other model.embedded" in message
    assert "unet_channels [16, 32] (this config: [32, 64])" in message and "\n" not in message, message
    assert not (tmp_path / "home").exists(), "nothing was built"


def test_compose_with_models_of_another_reference_is_one_line_before_pretraining(
    tiny_config, tiny_base_models, tmp_path, capfd, monkeypatch
):
    from training.reference import embedded

    monkeypatch.setattr(embedded, "train_classifier", _no_training)
    folders = _trained_on(tiny_base_models, tmp_path, tiny_config.model.model_dump(mode="json"))
    config = REPO / "configs" / "default.yaml"
    models = ",".join(map(str, folders))
    args = ["compose", "--weights", "0.5,0.5", "--models", models, "--num-images", "2", "--json"]
    code, out, err = msdda_main([*args, "--config", str(config)], capfd)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: base model ") and "other model.embedded settings" in err, err
    assert "train base models for this one" in err and "Traceback" not in err


def test_models_of_the_same_settings_pass_wherever_they_were_trained(tiny_config, tiny_base_models, tmp_path):
    """Checked only against the settings: a reproducible build gives the same reference elsewhere, so its
    hash is compared once the reference is there. Cards from before ``reference`` was recorded pass too."""
    from composition.engine import check_reference_settings
    from training.card import load_base_model

    recorded = tiny_config.model.model_dump(mode="json")
    del recorded["embedded"]["image_size"]  # a setting added since the card was written
    for reference in (recorded, {}):
        folders = _trained_on(tiny_base_models, tmp_path / str(len(reference)), reference)
        check_reference_settings([load_base_model(f) for f in folders], tiny_config)


def test_models_of_a_hub_checkpoint_are_refused_before_loading(tiny_config, tiny_base_models, tmp_path):
    from composition.engine import CompositionError, check_reference_settings
    from configs import parse_config
    from training.card import CardError, load_base_model

    hub = {"source": "pretrained", "pretrained": "org/model", "revision": None}
    folders = _trained_on(tiny_base_models, tmp_path / "hub", hub, "org/model@None")
    with pytest.raises(CompositionError) as info:
        check_reference_settings([load_base_model(f) for f in folders], tiny_config)
    assert "was trained on the hub checkpoint org/model@None" in str(info.value), str(info.value)
    assert "reference is the embedded model" in str(info.value)

    other_hub = parse_config({"model": hub | {"pretrained": "org/other"}}, "test")
    with pytest.raises(CardError) as info:  # the lineage check's own line, before any download
        check_reference_settings([load_base_model(f) for f in folders], other_hub)
    assert "this config's reference is org/other@No" in str(info.value) and "\n" not in str(info.value)
    same_hub = parse_config({"model": hub}, "test")
    check_reference_settings([load_base_model(f) for f in folders], same_hub)
