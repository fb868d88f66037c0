"""``MSDDAPipeline`` (composition/pipeline.py): the quickstart and the docstring example on the embedded
default, the same images as ``composition.engine.generate`` for every method, loading and unloading, the
per-step progress and callback, and every bad input as a one-line error."""

from __future__ import annotations

import doctest
import json
import shutil

import pytest
import torch

from composition.engine import CompositionError
from training.card import CARD_FILE

PROMPTS = ["a handwritten digit seven", "a handwritten digit two"]
REWARDS = ["digit_alignment", "ink_economy"]


@pytest.fixture(scope="module")
def ensemble(tiny_config, tiny_home, tiny_base_models):
    from composition.engine import load_ensemble

    return load_ensemble(tiny_config, tiny_home, tiny_base_models, prompts=PROMPTS)


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory, template_db, tiny_home, tiny_reference, tiny_base_models):
    """A home holding copies of the tiny reference and evaluator, with both tiny base models registered as
    champions in its own SQLite store; ``(home, tracking URI)``."""
    from tests.conftest import copy_pretrained
    from tests.helpers import register_champions

    home = copy_pretrained(tiny_home, tmp_path_factory.mktemp("registry_home"))
    shutil.copy(template_db, home / "mlflow.db")  # migrating a new store takes seconds
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        register_champions(home, tiny_base_models)
    return home, uri


def test_the_docstring_example_runs_on_the_embedded_default(
    registry_home, tiny_config_file, tmp_path, monkeypatch
):
    """The example in ``MSDDAPipeline.__call__``'s docstring, as written, with the tiny config as the default
    and a home where both base models are registered."""
    import configs.schema
    from composition.pipeline import EXAMPLE_DOC_STRING, MSDDAPipeline

    home, uri = registry_home
    monkeypatch.setenv("MSDDA_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(configs.schema, "DEFAULT_CONFIG", tiny_config_file)
    monkeypatch.chdir(tmp_path)
    assert EXAMPLE_DOC_STRING in MSDDAPipeline.__call__.__doc__
    code = EXAMPLE_DOC_STRING.replace("```py", "").replace("```", "")
    test = doctest.DocTestParser().get_doctest(code, {}, "MSDDAPipeline example", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 6
    from PIL import Image

    assert Image.open(tmp_path / "seven.png").size == (16, 16)


def test_quickstart(registry_home, tiny_base_models, monkeypatch):
    """The issue's quickstart: a reference folder, a registry spec and a base-model folder, one image."""
    from composition.pipeline import MSDDAPipeline

    home, uri = registry_home
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reference = next((home / "reference").iterdir())
    pipe = MSDDAPipeline.from_pretrained(reference)  # its home: the one it lies in
    assert pipe.msdda_home == home
    pipe.load_base_model("msdda-digit_alignment@champion")
    pipe.load_base_model(tiny_base_models[1])
    image = pipe("a handwritten digit seven", weights=[0.3, 0.7]).images[0]
    assert image.size == (16, 16)
    models = pipe.base_models
    assert list(models) == ["digit_alignment", "ink_economy"]
    assert models["digit_alignment"].source == "msdda-digit_alignment/1"
    assert models["ink_economy"].source == str(tiny_base_models[1])


@pytest.mark.parametrize("method", ["msdda", "db", "rs", "code", "rgg"])
def test_every_method_gives_the_images_of_generate(tiny_pipe, ensemble, tiny_config, method):
    """For the same models, method, weights and seed: the images, NFE and reward calls of
    ``composition.engine.generate``, bit for bit."""
    from composition.engine import batch_seeds, generate

    options = tiny_config.composition.model_copy(update={"batch_size": 8, "code_block": 2})
    weights = [0.3, 0.7]
    expected = generate(ensemble, method, weights, options, num_images=4, seed=3)
    rewards = REWARDS if method in ("code", "rgg") else None
    prompts = expected.prompts
    assert prompts == [*PROMPTS, *PROMPTS]
    output = tiny_pipe(prompts, weights, method, seed=3, output_type="pt", options=options, rewards=rewards)
    assert torch.equal(output.images, expected.images)
    assert output.nfe == expected.nfe_per_image and output.reward_calls == expected.reward_calls_per_image
    if method == "msdda":  # a generator and initial latents, diffusers' way, draw the same
        x_seed, noise_seed = batch_seeds(3, 0)
        x_T = torch.randn(expected.images.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(x_seed))
        generator = torch.Generator().manual_seed(noise_seed)
        again = tiny_pipe(
            prompts, weights, latents=x_T, generator=generator, output_type="pt", options=options
        )
        assert torch.equal(again.images, expected.images)
        other = tiny_pipe(prompts, weights, seed=4, output_type="pt", options=options)
        assert not torch.allclose(other.images, expected.images), "the seed matters"
        pil = tiny_pipe(prompts, weights, seed=3, options=options).images
        assert len(pil) == 4 and pil[0].size == (16, 16)
        latents = tiny_pipe(prompts, weights, seed=3, options=options, output_type="latent").images
        torch.testing.assert_close(latents, expected.latents, rtol=0, atol=0)


def test_progress_bar_and_callback_see_every_step(tiny_pipe, tiny_config, capfd):
    steps = tiny_config.sampling.num_inference_steps
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, timestep, tuple(tensors["latents"].shape)))
        return tensors

    tiny_pipe.set_progress_bar_config(disable=False)
    try:
        capfd.readouterr()
        tiny_pipe(PROMPTS, [0.5, 0.5], num_images_per_prompt=2, seed=0, callback_on_step_end=callback)
        assert f"{steps}/{steps}" in capfd.readouterr().err
    finally:
        tiny_pipe.set_progress_bar_config(disable=True)
    timesteps = [int(t) for t in tiny_pipe.scheduler.timesteps]
    assert seen == [(s, timesteps[s], (4, 4, 8, 8)) for s in range(steps)]

    def replaces(p, step, timestep, tensors):
        return {"latents": tensors["latents"] + 1}

    with pytest.raises(CompositionError, match="callback_on_step_end returned other latents"):
        tiny_pipe(PROMPTS, [0.5, 0.5], seed=0, callback_on_step_end=replaces)


def test_load_unload_and_adapter_names(tiny_pipe, tiny_base_models):
    output = tiny_pipe(PROMPTS, [0.5, 0.5], seed=1, output_type="pt", method="rs")  # builds the soup adapter
    tiny_pipe.unload_base_model("ink_economy")
    assert list(tiny_pipe.base_models) == ["digit_alignment"]
    assert "ink_economy" not in tiny_pipe.unet.peft_config
    with pytest.raises(CompositionError, match="1 weights given|2 weights given for 1"):
        tiny_pipe(PROMPTS, [0.5, 0.5])
    assert tiny_pipe(PROMPTS, [1.0], seed=1, method="rs", output_type="pt").images.shape == (2, 3, 16, 16)
    with pytest.raises(CompositionError, match="already loaded"):
        tiny_pipe.load_base_model(tiny_base_models[0])
    tiny_pipe.load_base_model(tiny_base_models[0], adapter_name="alignment_again")
    assert list(tiny_pipe.base_models) == ["digit_alignment", "alignment_again"]
    assert tiny_pipe.base_models["alignment_again"].card.objective == "digit_alignment"
    tiny_pipe.unload_base_model("alignment_again")
    tiny_pipe.load_base_model(tiny_base_models[1])
    again = tiny_pipe(PROMPTS, [0.5, 0.5], seed=1, output_type="pt", method="rs")
    assert torch.equal(again.images, output.images), "unloading and loading again gives the same model"
    with pytest.raises(CompositionError, match="no base model named 'nope' is loaded; loaded: digit_"):
        tiny_pipe.unload_base_model("nope")
    for name in ["digit_alignment", "ink_economy"]:  # none left, then both again
        tiny_pipe.unload_base_model(name)
    for folder in tiny_base_models:
        tiny_pipe.load_base_model(folder)
    assert torch.equal(
        tiny_pipe(PROMPTS, [0.5, 0.5], seed=1, output_type="pt", method="rs").images, output.images
    )


# ----------------------------------------------------------------------------------------------- bad input


def test_no_base_model_loaded(tiny_reference):
    from composition.pipeline import MSDDAPipeline

    empty = MSDDAPipeline.from_pretrained(tiny_reference.path)
    with pytest.raises(CompositionError, match="no base model is loaded: call pipe.load_base_model"):
        empty("a handwritten digit seven", weights=[])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.3, 0.3, 0.4], "3 weights given for 2 base models"),
        ([float("nan"), 0.5], "finite"),
        (None, "pass weights="),
    ],
)
def test_bad_weights(tiny_pipe, weights, message):
    with pytest.raises(CompositionError, match=message):
        tiny_pipe(PROMPTS, weights)


def test_non_positive_composed_precision(tiny_pipe):
    with pytest.raises(CompositionError, match="precision is not positive"):
        tiny_pipe(PROMPTS, [-5.0, 5.0], seed=0)


def test_unknown_method(tiny_pipe):
    with pytest.raises(
        CompositionError, match="unknown method 'mdsda'; choose from msdda, db, rs, code, rgg"
    ):
        tiny_pipe(PROMPTS, [0.5, 0.5], method="mdsda")


@pytest.mark.parametrize("method", ["code", "rgg"])
def test_searches_need_rewards(tiny_pipe, method):
    with pytest.raises(CompositionError, match=rf"{method} calls rewards while sampling: pass rewards="):
        tiny_pipe(PROMPTS, [0.5, 0.5], method=method)
    with pytest.raises(CompositionError, match="1 rewards given for 2 base models"):
        tiny_pipe(PROMPTS, [0.5, 0.5], method=method, rewards=["ink_economy"])


def test_rgg_refuses_a_reward_without_gradient(tiny_pipe):
    with pytest.raises(
        CompositionError, match="rgg needs differentiable rewards; not differentiable: ink_economy"
    ):
        tiny_pipe(PROMPTS, [0.5, 0.5], method="rgg", rewards=["digit_alignment", "compressibility"])


def test_a_prompt_the_reward_cannot_read(tiny_pipe):
    with pytest.raises(
        CompositionError, match="'digit_alignment' of base model 'digit_alignment' cannot score"
    ):
        tiny_pipe("a cat", [0.5, 0.5], method="code", rewards=REWARDS)


def test_a_base_model_of_another_reference(tiny_pipe, tiny_base_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_base_models[1], other)
    card = json.loads((other / CARD_FILE).read_text())
    (other / CARD_FILE).write_text(json.dumps({**card, "reference_hash": "f" * 64}))
    with pytest.raises(
        CompositionError, match="was trained on the reference ffffffffffff, not on this pipeline"
    ):
        tiny_pipe.load_base_model(other, adapter_name="other")
    assert list(tiny_pipe.base_models) == ["digit_alignment", "ink_economy"]
    with pytest.raises(CompositionError, match="no base-model folder at ./missing"):
        tiny_pipe.load_base_model("./missing")


def test_sampling_settings_come_from_the_cards(tiny_pipe, tiny_config):
    steps = tiny_config.sampling.num_inference_steps
    tiny_pipe(PROMPTS, [0.5, 0.5], num_inference_steps=steps, eta=1.0, output_type="latent")  # the cards' own
    with pytest.raises(
        CompositionError, match=f"num_inference_steps=50 differs from the base models' .* {steps}"
    ):
        tiny_pipe(PROMPTS, [0.5, 0.5], num_inference_steps=50)
    with pytest.raises(CompositionError, match="guidance_scale=7.5 differs"):
        tiny_pipe(PROMPTS, [0.5, 0.5], guidance_scale=7.5)
