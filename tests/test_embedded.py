"""The embedded reference: SD format, loadable by the stock pipeline, deterministic, cached."""

import json
import time

import numpy as np
import pytest
import torch

from training.embedded import pretrain_reference, reference_key
from training.models import content_hash


@pytest.fixture(scope="module")
def pipe(tiny_reference):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_reference.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_in_stable_diffusion_format(tiny_reference):
    index = json.loads((tiny_reference.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not list(tiny_reference.path.rglob("*.bin")), "weights are safetensors only"


def test_stock_pipeline_generates_images(pipe, tiny_config):
    size = tiny_config.model.embedded.image_size
    out = pipe(["a handwritten digit seven", "handwritten two"], num_inference_steps=3, eta=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, size, size, 3)
    assert np.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    pil = pipe("a handwritten digit one", num_inference_steps=2).images[0]
    assert pil.size == (size, size)


def test_same_seed_same_samples(pipe):
    def sample(seed):
        return pipe("a handwritten digit four", num_inference_steps=3, eta=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    np.testing.assert_array_equal(sample(5), sample(5))
    assert not np.array_equal(sample(5), sample(6))


def test_second_call_is_cached(tiny_config, tiny_home, tiny_reference):
    start = time.perf_counter()
    again = pretrain_reference(tiny_config, tiny_home, progress=False)
    assert again.cached and again.path == tiny_reference.path
    assert again.alignment_accuracy == tiny_reference.alignment_accuracy
    assert time.perf_counter() - start < 5


def test_changed_sampling_re_measures_alignment_in_place(tiny_config, tiny_home, tiny_reference, tmp_path):
    """A cached model evaluated under other sampling settings gets its metadata rewritten (atomically)."""
    import shutil

    from training.embedded import META_FILE

    home = tmp_path / "copied_home"
    shutil.copytree(tiny_home, home)
    path = home / tiny_reference.path.relative_to(tiny_home)
    before = content_hash(path)
    sampling = tiny_config.sampling.model_copy(update={"eta": 0.5})
    again = pretrain_reference(tiny_config.model_copy(update={"sampling": sampling}), home, progress=False)
    assert again.cached and again.path == path
    meta = json.loads((path / META_FILE).read_text())
    assert meta["alignment_eval"]["eta"] == 0.5 and meta["alignment_accuracy"] == again.alignment_accuracy
    assert content_hash(path) == before, "the metadata is not part of the model's identity"
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")], "no temporary file is left"


def test_same_seed_gives_the_same_model(tiny_config, tiny_reference, tmp_path):
    rebuilt = pretrain_reference(tiny_config, tmp_path / "other_home", progress=False)
    assert not rebuilt.cached
    assert content_hash(rebuilt.path) == content_hash(tiny_reference.path)


def test_cache_key_tracks_the_recipe(tiny_config):
    changed = tiny_config.model_copy(
        update={"pretrain": tiny_config.pretrain.model_copy(update={"seed": 1})}
    )
    threads = tiny_config.model_copy(
        update={"pretrain": tiny_config.pretrain.model_copy(update={"num_threads": 1})}
    )
    assert reference_key(changed) != reference_key(tiny_config)
    assert reference_key(threads) == reference_key(tiny_config)


def test_metadata_reports_quality(tiny_reference):
    assert 0.0 <= tiny_reference.alignment_accuracy <= 1.0
    assert 0.0 <= tiny_reference.classifier_test_accuracy <= 1.0
    assert tiny_reference.pretrain_seconds > 0
