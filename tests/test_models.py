"""Loading real Stable Diffusion checkpoints through the same code, with one-line errors."""

import shutil

import pytest

from configs import parse_config
from training.models import ModelLoadError, content_hash, load_pretrained_pipeline, load_reference_pipeline


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


def test_content_hash_changes_with_weights(tiny_reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_reference.path, copy)
    assert content_hash(copy) == content_hash(tiny_reference.path)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"eta"', '"eta"').replace("1000", "999"))
    assert content_hash(copy) != content_hash(tiny_reference.path)
