"""Damaged cached artefacts (issue 20) are never trusted: a base model whose weights no longer match its card
is retrained (never registered as it is), a damaged embedded reference or evaluator CNN is rebuilt, a damaged
training checkpoint is discarded with a warning, and what cannot be repaired is refused in one line. A file
the OS cannot read now (permission denied, an I/O error) is no damage: one line, and nothing is removed."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import msdda_main
from training.card import CARD_FILE, LORA_FILE, VARIANCE_FILE, CardError, load_base_model
from training.storage import ModelLoadError, content_hash


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    """Change the lowest bit of the last float32 in the file: it still parses and is finite, only a hash
    tells."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


def _refuse_to_open(monkeypatch, path: Path, error: int = errno.EACCES) -> None:
    """Make the sound file at ``path`` unreadable as the OS would (tests run as root, so ``chmod`` cannot):
    opening it raises ``OSError(error)``, and safetensors, which reports any file it cannot open as missing,
    raises its ``FileNotFoundError``."""
    import safetensors
    import safetensors.torch

    open_path, safe_open = Path.open, safetensors.safe_open

    def refusing_open(self, *args, **kwargs):
        if self == path:
            raise OSError(error, os.strerror(error), str(self))
        return open_path(self, *args, **kwargs)

    def refusing_safe_open(filename, *args, **kwargs):
        if Path(filename) == path:
            raise FileNotFoundError(f"No such file or directory: {str(filename)!r}")
        return safe_open(filename, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    monkeypatch.setattr(safetensors, "safe_open", refusing_safe_open)
    monkeypatch.setattr(safetensors.torch, "safe_open", refusing_safe_open)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes (read past :func:`_refuse_to_open`)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:  # the builtin, not Path.open
            files[path.relative_to(folder).as_posix()] = handle.read()
    return files


def _assert_unreadable_file_error(message: str, path: Path, error: int) -> None:
    assert f"cannot read {path} ({os.strerror(error)})" in message, message
    assert "nothing was changed" in message and message.strip().count("\n") == 0, message


# ------------------------------------------------------------------------------------------------ base models


def test_saved_card_records_the_weights_hashes_and_a_changed_byte_is_refused(tiny_base_models, tmp_path):
    folder = shutil.copytree(tiny_base_models[0], tmp_path / "model")
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["weights_sha256"].keys() == {LORA_FILE, VARIANCE_FILE}
    _flip_last_byte(folder / LORA_FILE)
    with pytest.raises(CardError) as info:
        load_base_model(folder)
    message = str(info.value)
    assert LORA_FILE in message and "does not match the SHA-256" in message and "\n" not in message


def test_a_card_without_hashes_still_loads(tiny_base_models, tmp_path):
    """Cards written before ``weights_sha256`` existed are checked by parsing alone."""
    folder = shutil.copytree(tiny_base_models[0], tmp_path / "model")
    card = json.loads((folder / CARD_FILE).read_text())
    del card["weights_sha256"]
    (folder / CARD_FILE).write_text(json.dumps(card))
    assert load_base_model(folder).card.weights_sha256 == {}


def test_compose_with_a_truncated_base_model_is_one_line(
    pretrained_home, tiny_base_models, tiny_config_file, tmp_path, capfd
):
    damaged = shutil.copytree(tiny_base_models[0], tmp_path / "damaged")
    _truncate(damaged / LORA_FILE)
    models = f"{damaged},{tiny_base_models[1]}"
    args = ["compose", "--weights", "0.5,0.5", "--models", models, "--num-images", "2"]
    code, out, err = msdda_main([*args, "--config", str(tiny_config_file), "--json"], capfd)
    assert code == 2 and out == "", err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert str(damaged) in err and LORA_FILE in err and "Traceback" not in err


def test_train_retrains_a_damaged_cached_model_instead_of_registering_it(
    pretrained_home, tiny_config_file, capfd, monkeypatch
):
    """`msdda train` used to report the damaged folder as cached and register its files as a new version."""
    from flows.registry import list_models
    from flows.tracking import mlflow_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the home's own SQLite store

    args = ["train", "--objective", "ink_economy", "--config", str(tiny_config_file), "--json"]
    code, out, err = msdda_main([*args, "--no-mlflow"], capfd)
    assert code == 0, err
    folder = Path(json.loads(out)["path"])
    _truncate(folder / LORA_FILE)

    code, out, err = msdda_main(args, capfd)
    assert code == 0, err
    again = json.loads(out)
    assert again["cached"] is False and again["path"] == str(folder)
    assert "warning: " in err and LORA_FILE in err and "retraining it now" in err and "Traceback" not in err
    assert "retrain it with" not in err, "no remedy for what is being done"
    load_base_model(folder)  # whole again
    registered = again["registered"]
    assert registered["content_hash"] == content_hash(folder), "what is registered is the retrained folder"
    assert [v["content_hash"] for v in list_models(pretrained_home)] == [content_hash(folder)]
    assert not list(folder.parent.glob(".*")), "nothing is left aside"
    # Registered after its training run closed: a store failure while closing the run used to leave a new
    # champion version whose run stayed RUNNING and the command reporting failure.
    client = mlflow_client(pretrained_home)
    run = client.get_run(registered["run_id"]).info
    version = client.get_model_version(registered["name"], registered["version"])
    assert run.status == "FINISHED" and version.creation_timestamp >= run.end_time


@pytest.mark.parametrize("damage", ["card missing", "weights truncated"])
def test_the_retraining_warning_says_only_what_happens(tiny_base_models, tmp_path, capsys, damage):
    """It used to add the remedy to the warning, "retrain it with `msdda train --objective <objective>`
    (retraining it now)": a remedy for what is being done, with a placeholder for the name being trained."""
    from training.base_model import _verified_cache

    folder = shutil.copytree(tiny_base_models[0], tmp_path / "model")
    if damage == "card missing":
        (folder / CARD_FILE).unlink()
    else:
        _truncate(folder / LORA_FILE)
    assert _verified_cache(folder) is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: base model at {folder} is corrupt or incomplete: "), err
    assert err.endswith("; retraining it now\n") and err.count("\n") == 1, err
    assert "retrain it with" not in err and "<objective>" not in err, err


def test_train_never_overwrites_a_model_of_a_newer_card_format(pretrained_home, tiny_config_file, capfd):
    """Not damaged, only newer: refused in one line, never retrained over (guards the retraining above)."""
    args = ["train", "--objective", "ink_economy", "--config", str(tiny_config_file), "--no-mlflow", "--json"]
    code, out, err = msdda_main(args, capfd)
    assert code == 0, err
    folder = Path(json.loads(out)["path"])
    card = json.loads((folder / CARD_FILE).read_text())
    (folder / CARD_FILE).write_text(json.dumps({**card, "format_version": 99}))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = msdda_main(args, capfd)
    assert code == 2 and "update msdda" in err and err.strip().count("\n") == 0, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


UNREADABLE_BASE_MODEL = {CARD_FILE: errno.EACCES, LORA_FILE: errno.EACCES, VARIANCE_FILE: errno.EIO}


@pytest.mark.parametrize("name", UNREADABLE_BASE_MODEL)
def test_a_base_model_the_os_cannot_read_is_no_card_error(tiny_base_models, tmp_path, monkeypatch, name):
    """A :class:`CardError` has the model retrained over; a file the OS cannot read says nothing of it."""
    folder = shutil.copytree(tiny_base_models[0], tmp_path / "model")
    _refuse_to_open(monkeypatch, folder / name, UNREADABLE_BASE_MODEL[name])
    with pytest.raises(ModelLoadError) as info:
        load_base_model(folder)
    assert not isinstance(info.value, CardError)
    _assert_unreadable_file_error(str(info.value), folder / name, UNREADABLE_BASE_MODEL[name])


def test_train_never_retrains_over_a_model_it_cannot_read(
    pretrained_home, tiny_config_file, capfd, monkeypatch
):
    """It used to take a permission problem for damage and train a new model over the old one."""
    args = ["train", "--objective", "ink_economy", "--config", str(tiny_config_file), "--no-mlflow", "--json"]
    code, out, err = msdda_main(args, capfd)
    assert code == 0, err
    folder = Path(json.loads(out)["path"])
    before = _snapshot(folder)
    _refuse_to_open(monkeypatch, folder / LORA_FILE)
    code, out, err = msdda_main(args, capfd)
    assert code == 2 and out == "" and err.startswith("error: "), err
    _assert_unreadable_file_error(err, folder / LORA_FILE, errno.EACCES)
    assert _snapshot(folder) == before and sorted(folder.parent.iterdir()) == [folder]


# ------------------------------------------------------------------------------- embedded reference and CNN


def _reference_folder(home: Path) -> Path:
    (folder,) = (home / "reference").iterdir()
    return folder


def _legacy(folder: Path) -> None:
    """As a cache built before ``DONE`` held a manifest: an empty ``DONE``."""
    (folder / "DONE").write_text("")


REFERENCE_DAMAGE = {
    "unet weights truncated": (
        lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
        "unet/diffusion_pytorch_model.safetensors is unreadable",
    ),
    "text encoder weights missing": (
        lambda f: (f / "text_encoder" / "model.safetensors").unlink(),
        "text_encoder/ weights",
    ),
    "unet config broken": (
        lambda f: (f / "unet" / "config.json").write_text("{broken"),
        "unet/config.json is unreadable",
    ),
    "metadata broken": (
        lambda f: (f / "msdda_reference.json").write_text("{broken"),
        "msdda_reference.json is unreadable",
    ),
    "metadata without keys": (
        lambda f: (f / "msdda_reference.json").write_text("{}"),
        "msdda_reference.json lacks alignment_accuracy",
    ),
    "tokenizer file missing": (
        lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
        "tokenizer/tokenizer.json is missing",
    ),
    "one weight byte changed": (
        lambda f: _flip_last_byte(f / "vae" / "diffusion_pytorch_model.safetensors"),
        "differ from the content hash recorded",
    ),
    "legacy cache, weights truncated": (
        lambda f: (_legacy(f), _truncate(f / "vae" / "diffusion_pytorch_model.safetensors")),
        "vae/diffusion_pytorch_model.safetensors is unreadable",
    ),
    "marker missing": (lambda f: (f / "DONE").unlink(), "DONE is missing"),
}


@pytest.mark.parametrize("case", REFERENCE_DAMAGE)
def test_a_damaged_reference_cache_is_not_trusted(tiny_reference, tmp_path, case):
    from training.reference.embedded import CacheError, check_reference_cache

    folder = shutil.copytree(tiny_reference.path, tmp_path / "reference")
    assert check_reference_cache(folder) == tiny_reference.reference_hash
    damage, fragment = REFERENCE_DAMAGE[case]
    damage(folder)
    with pytest.raises(CacheError) as info:
        check_reference_cache(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_reference_cache_records_its_files_and_hash(tiny_reference):
    manifest = json.loads((tiny_reference.path / "DONE").read_text())
    assert manifest["content_hash"] == content_hash(tiny_reference.path) == tiny_reference.reference_hash
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"]


def test_pretrain_rebuilds_a_damaged_reference(
    pretrained_home, tiny_reference, tiny_config_file, capfd, monkeypatch
):
    """`msdda pretrain` used to report a damaged cache as cached; the next command then crashed. It rebuilds
    with the thread count the damaged one was built with, whatever this process's: the model is byte-identical
    only for a thread count (at 1 and 2 threads the tiny reference differs), and another count used to strand
    every base model trained on the old reference (``reference_hash``)."""
    folder = _reference_folder(pretrained_home)
    built_with = json.loads((folder / "msdda_reference.json").read_text())["torch_threads"]
    other = 1 if built_with > 1 else 2
    monkeypatch.setenv("OMP_NUM_THREADS", str(other))  # the CLI runs with another count
    _truncate(folder / "unet" / "diffusion_pytorch_model.safetensors")
    code, out, err = msdda_main(["pretrain", "--config", str(tiny_config_file), "--json"], capfd)
    assert code == 0, err
    assert f"the cached reference model at {folder} is damaged" in err and "rebuilding it" in err, err
    assert f"with the {built_with} torch threads it was built with" in err, err
    assert torch.get_num_threads() == other, "the process's own count is restored"
    assert "unet/diffusion_pytorch_model.safetensors is unreadable" in err and "Traceback" not in err
    payload = json.loads(out)
    assert payload["cached"] is False and payload["trained"] is True and payload["path"] == str(folder)
    assert payload["reference_hash"] == content_hash(folder) == tiny_reference.reference_hash
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "nothing is left aside"
    code, out, err = msdda_main(["pretrain", "--config", str(tiny_config_file), "--json"], capfd)
    assert code == 0 and json.loads(out)["cached"] is True and "warning" not in err, err


@pytest.mark.parametrize("metadata", ["sound", "broken"])
def test_a_damaged_reference_is_rebuilt_with_the_thread_count_it_records(
    tiny_config, tiny_reference, tmp_path, capfd, monkeypatch, metadata
):
    """What the rebuild runs with (the build itself replaced): the recorded count, or, when the metadata
    cannot say, this process's count and a warning that base models on the old reference need retraining."""
    from training.reference import embedded

    home = tmp_path / "home"
    folder = shutil.copytree(tiny_reference.path, home / "reference" / tiny_reference.path.name)
    built_with = json.loads((folder / "msdda_reference.json").read_text())["torch_threads"]
    other = 1 if built_with > 1 else 2
    if metadata == "sound":
        _truncate(folder / "unet" / "diffusion_pytorch_model.safetensors")
    else:
        (folder / "msdda_reference.json").write_text("{broken")
    used = []
    monkeypatch.setattr(embedded, "_build_reference", lambda *args: used.append(torch.get_num_threads()))
    torch.set_num_threads(other)
    capfd.readouterr()
    embedded.pretrain_reference(tiny_config, home, progress=False)
    (warning,) = capfd.readouterr().err.splitlines()
    assert used == [built_with if metadata == "sound" else other]
    assert torch.get_num_threads() == other, "the process's own count is restored"
    if metadata == "sound":
        assert f"rebuilding it with the {built_with} torch threads it was built with" in warning, warning
    else:
        assert f"rebuilding it with {other} torch threads (its metadata does not say" in warning, warning
        assert "base models trained on the old reference need retraining" in warning, warning


def test_the_recorded_thread_count_is_read_only_when_sound(tiny_reference, tmp_path):
    from training.reference.embedded import _recorded_threads

    folder = shutil.copytree(tiny_reference.path, tmp_path / "reference")
    recorded = json.loads((folder / "msdda_reference.json").read_text())["torch_threads"]
    assert _recorded_threads(folder) == recorded
    for broken in ("{broken", "[]", '{"torch_threads": "2"}', '{"torch_threads": 0}', "{}"):
        (folder / "msdda_reference.json").write_text(broken)
        assert _recorded_threads(folder) is None, broken


UNREADABLE_REFERENCE = {
    "DONE": errno.EACCES,
    "unet/diffusion_pytorch_model.safetensors": errno.EACCES,
    "unet/config.json": errno.EIO,
    "tokenizer/merges.txt": errno.EIO,  # read by the content hash alone
}


@pytest.mark.parametrize("name", UNREADABLE_REFERENCE)
def test_pretrain_leaves_a_reference_it_cannot_read_as_it_is(
    pretrained_home, tiny_config_file, capfd, monkeypatch, name
):
    """It used to take a permission problem for damage: the cache was removed and pretrained again."""
    folder = _reference_folder(pretrained_home)
    before = _snapshot(folder)
    _refuse_to_open(monkeypatch, folder / name, UNREADABLE_REFERENCE[name])
    code, out, err = msdda_main(["pretrain", "--config", str(tiny_config_file), "--json"], capfd)
    assert code == 2 and out == "" and err.startswith("error: "), err
    _assert_unreadable_file_error(err, folder / name, UNREADABLE_REFERENCE[name])
    assert _snapshot(folder) == before and sorted(folder.parent.iterdir()) == [folder]


CLASSIFIER_DAMAGE = {
    "weights truncated": (lambda f: _truncate(f / "model.safetensors"), "model.safetensors is unreadable"),
    "weights missing": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    "report broken": (lambda f: (f / "classifier.json").write_text("{"), "classifier.json is unreadable"),
    "one byte changed": (lambda f: _flip_last_byte(f / "model.safetensors"), "differ from the content hash"),
}


@pytest.mark.parametrize("case", CLASSIFIER_DAMAGE)
def test_a_damaged_evaluator_cnn_cache_is_not_trusted(tiny_home, tiny_reference, tmp_path, case):
    from training.reference.embedded import CacheError, check_classifier_cache

    (cached,) = (tiny_home / "classifiers").iterdir()
    folder = shutil.copytree(cached, tmp_path / "classifier")
    check_classifier_cache(folder)
    damage, fragment = CLASSIFIER_DAMAGE[case]
    damage(folder)
    with pytest.raises(CacheError) as info:
        check_classifier_cache(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_damaged_evaluator_cnn_is_retrained(tiny_config, pretrained_home, capfd):
    """The `digit_alignment` reward's weights: a truncated cache used to crash loading it."""
    from training.reference.embedded import digit_classifier
    from training.rewards import load_reward

    (folder,) = (pretrained_home / "classifiers").iterdir()
    before = content_hash(folder)
    _truncate(folder / "model.safetensors")
    capfd.readouterr()
    load_reward("digit_alignment", tiny_config, pretrained_home)
    err = capfd.readouterr().err
    assert f"the cached evaluator CNN at {folder} is damaged" in err, err
    assert content_hash(folder) == before, "the same CNN again (deterministic for a seed)"
    digit_classifier(tiny_config, pretrained_home, progress=False)
    assert capfd.readouterr().err == "", "the rebuilt CNN is trusted"


def test_unreadable_pipeline_and_classifier_are_one_line(tiny_reference, tiny_home, tmp_path):
    from training.reference.classifier import load_classifier
    from training.reference.embedded import load_embedded_pipeline

    reference = shutil.copytree(tiny_reference.path, tmp_path / "reference")
    (reference / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_embedded_pipeline(reference)  # no fallback to a pickled .bin either
    assert str(reference) in str(info.value) and "\n" not in str(info.value)

    (classifier,) = (tiny_home / "classifiers").iterdir()
    classifier = shutil.copytree(classifier, tmp_path / "classifier")
    _truncate(classifier / "model.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_classifier(classifier)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_a_corrupt_reward_head_is_one_line(tiny_config, tmp_path):
    from training.rewards import RewardError, load_reward

    head = tmp_path / "head.safetensors"
    save_file({"layer.weight": torch.zeros(1, 4), "layer.bias": torch.zeros(1)}, head)
    _truncate(head)
    with pytest.raises(RewardError) as info:
        load_reward("laion_aesthetic", tiny_config, tmp_path, {"head": str(head)})
    assert str(head) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- training checkpoints


def _rewrite_iteration(directory: Path, iteration: int, history_length: int | None = None) -> None:
    """Make the checkpoint claim ``iteration``, with a history of ``history_length`` iterations (the one it
    has, its last entry repeated)."""
    meta = json.loads((directory / "checkpoint.json").read_text())
    history = meta["history"]
    if history_length is not None:
        history = [{**history[min(i, len(history) - 1)], "iteration": i + 1} for i in range(history_length)]
    meta.update(iteration=iteration, history=history)
    (directory / "checkpoint.json").write_text(json.dumps(meta))


CHECKPOINT_DAMAGE = {
    "tensors truncated": lambda d: _truncate(d / "checkpoint.safetensors"),
    "tensors missing": lambda d: (d / "checkpoint.safetensors").unlink(),
    "metadata broken": lambda d: (d / "checkpoint.json").write_text("{broken"),
    "metadata missing": lambda d: (d / "checkpoint.json").unlink(),
    "tensors of another model": lambda d: save_file(
        {"model.x": torch.zeros(1), "rng.generator": torch.zeros(1), "rng.torch": torch.zeros(1)},
        d / "checkpoint.safetensors",
    ),
    # these used to resume "finished" (or further on than trained) and so register an undertrained model
    "iteration past the run": lambda d: _rewrite_iteration(d, 9, history_length=9),
    "iteration past its history": lambda d: _rewrite_iteration(d, 4),
    "iteration negative": lambda d: _rewrite_iteration(d, -1, history_length=0),
    "iteration not a whole number": lambda d: _rewrite_iteration(d, 2.5),
}


def _toy():
    from training.analysis.toy import ToyProblem

    torch.manual_seed(0)
    return ToyProblem(num_inference_steps=5)


def _toy_config():
    from configs import TrainConfig

    return TrainConfig(
        iterations=4, checkpoint_every=2, seed=0, batch_size=16, states_per_trajectory=3, num_actions=8
    )


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_discarded_and_training_starts_over(tmp_path, capfd, case):
    """The run then trains exactly what a run without the checkpoint trains."""
    from training.trainer import train

    toy, config = _toy, _toy_config()
    straight = toy()
    expected = train(straight, config, progress=False)
    checkpoint = tmp_path / "ckpt"
    train(toy(), config, checkpoint_dir=checkpoint, progress=False, stop_after=3)  # "killed" after 3
    CHECKPOINT_DAMAGE[case](checkpoint)

    capfd.readouterr()
    resumed = toy()
    result = train(resumed, config, checkpoint_dir=checkpoint, progress=False)
    err = capfd.readouterr().err
    assert "warning: the training checkpoint" in err and "training from scratch" in err, err
    assert "resuming" not in err and "Traceback" not in err
    assert [m.loss for m in result.history] == [m.loss for m in expected.history]
    for key, value in straight.trainable_state().items():
        torch.testing.assert_close(resumed.trainable_state()[key], value, rtol=0, atol=0)
    assert (checkpoint / "checkpoint.json").exists(), "the run wrote a sound checkpoint again"


def test_train_cli_with_a_truncated_checkpoint_warns_and_trains(
    pretrained_home, tiny_config, tiny_reference, tiny_config_file, capfd
):
    from training.base_model import run_key

    key = run_key(tiny_config.for_objective("ink_economy"), "ink_economy", content_hash(tiny_reference.path))
    checkpoint = pretrained_home / "checkpoints" / f"ink_economy-{key}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    (checkpoint / "checkpoint.json").write_text(json.dumps({"iteration": 1, "history": []}))
    args = ["train", "--objective", "ink_economy", "--config", str(tiny_config_file), "--no-mlflow", "--json"]
    code, out, err = msdda_main(args, capfd)
    assert code == 0, err
    assert "checkpoint.safetensors is damaged" in err and "training from scratch" in err, err
    assert json.loads(out)["cached"] is False and "Traceback" not in err


UNREADABLE_CHECKPOINT = {"checkpoint.safetensors": errno.EACCES, "checkpoint.json": errno.EIO}


@pytest.mark.parametrize("name", UNREADABLE_CHECKPOINT)
def test_a_checkpoint_the_os_cannot_read_is_kept(tmp_path, capfd, monkeypatch, name):
    """It used to take an I/O error for damage: the checkpoint was removed and training started over."""
    from training.trainer import train

    checkpoint = tmp_path / "ckpt"
    train(_toy(), _toy_config(), checkpoint_dir=checkpoint, progress=False, stop_after=3)
    before = _snapshot(checkpoint)
    _refuse_to_open(monkeypatch, checkpoint / name, UNREADABLE_CHECKPOINT[name])
    capfd.readouterr()
    with pytest.raises(ModelLoadError) as info:
        train(_toy(), _toy_config(), checkpoint_dir=checkpoint, progress=False)
    _assert_unreadable_file_error(str(info.value), checkpoint / name, UNREADABLE_CHECKPOINT[name])
    assert "training from scratch" not in capfd.readouterr().err
    assert _snapshot(checkpoint) == before
