"""Loading real Stable Diffusion checkpoints through the same code, with one-line errors."""

import shutil

import pytest

from configs import parse_config
from training.reference.checkpoint import load_pretrained_pipeline
from training.reference.loader import load_reference_pipeline
from training.storage import ModelLoadError, atomic_file, content_hash, staged_directory


def test_local_checkpoint_loads(tiny_reference):
    pipe = load_pretrained_pipeline(str(tiny_reference.path))
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_config_with_local_checkpoint_loads(tiny_reference):
    config = parse_config({"model": {"source": "pretrained", "pretrained": str(tiny_reference.path)}})
    pipe = load_reference_pipeline(config)
    assert pipe.unet.config.sample_size == 8


def test_missing_weights_are_named(tiny_reference, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_reference.path, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError) as info:
        load_pretrained_pipeline(str(broken))
    message = str(info.value)
    assert "unet/ weights" in message and "\n" not in message


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained_pipeline(str(tmp_path / "nowhere"))


def test_hub_id_offline_without_cache_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError) as info:
        load_pretrained_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    message = str(info.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "\n" not in message


def test_content_hash_changes_with_weights_and_configs(tiny_reference, tmp_path):
    from safetensors.torch import load_file, save_file

    from training.reference.embedded import META_FILE

    copy = tmp_path / "copy"
    shutil.copytree(tiny_reference.path, copy)
    original = content_hash(tiny_reference.path)
    assert content_hash(copy) == original

    # one weight of the UNet, nudged
    (weights,) = (copy / "unet").glob("*.safetensors")
    tensors = load_file(weights)
    name = min(tensors)
    before = tensors[name].clone()
    tensors[name] = before.clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert not load_file(weights)[name].equal(before)
    with_weight = content_hash(copy)
    assert with_weight != original

    # a config value: the scheduler's number of training timesteps
    config = copy / "scheduler" / "scheduler_config.json"
    text = config.read_text()
    changed = text.replace('"num_train_timesteps": 1000', '"num_train_timesteps": 999')
    assert changed != text
    config.write_text(changed)
    with_config = content_hash(copy)
    assert with_config not in (original, with_weight)

    # our own metadata (msdda_*) is not part of the model's identity
    meta = copy / META_FILE
    meta.write_text(meta.read_text().replace('"alignment_accuracy"', '"alignment_accuracy_renamed"'))
    assert content_hash(copy) == with_config


def test_atomic_file_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    with atomic_file(target) as tmp:  # the folder is created; the target need not exist
        assert tmp.parent == target.parent and not tmp.exists() and tmp.name.endswith(".tmp")
        tmp.write_text("first")
        assert not target.exists(), "nothing is visible before the block succeeds"
    assert target.read_text() == "first"
    with atomic_file(target) as tmp:
        tmp.write_text("second")
        assert target.read_text() == "first"
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), atomic_file(target) as tmp:
        tmp.write_text("half-wri")
        raise RuntimeError("half-way")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"], "no temporary file is left behind"
    with pytest.raises(FileNotFoundError), atomic_file(target):
        pass  # a block that writes nothing does not replace the file with nothing
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_staged_directory_replaces_or_keeps_the_existing_folder(tmp_path):
    final = tmp_path / "cache" / "key"
    with staged_directory(final) as tmp:
        (tmp / "DONE").write_text("1")
    with staged_directory(final) as tmp:  # the default replaces
        (tmp / "DONE").write_text("2")
    assert (final / "DONE").read_text() == "2"
    with staged_directory(final, keep_existing=True) as tmp:  # a concurrent build that won is kept
        (tmp / "DONE").write_text("3")
    assert (final / "DONE").read_text() == "2"
    with pytest.raises(KeyError), staged_directory(final) as tmp:
        (tmp / "DONE").write_text("4")
        raise KeyError("boom")
    assert (final / "DONE").read_text() == "2"
    assert [p.name for p in final.parent.iterdir()] == ["key"]
