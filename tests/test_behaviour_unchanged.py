"""The same seeds give the same images, rewards and trained weights as before the step-kernel restructuring.

``tests/data/golden_behaviour.*`` were captured at commit 0569953, the last commit before the restructuring
(seven reverse loops, five sampler classes), by running these same cases on the tiny embedded default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"
CASES = [
    ("msdda", [0.3, 0.7]),
    ("msdda", [0.6, 0.6]),
    ("msdda", [1.2, -0.2]),
    ("db", [0.3, 0.7]),
    ("db", [0.6, 0.6]),
    ("rs", [0.3, 0.7]),
    ("code", [0.3, 0.7]),
    ("rgg", [0.3, 0.7]),
]
# The restructured kernels sample with sqrt(sigma^2) where the old loops used sigma: equal up to rounding.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# Trained weights compound the rounding of every optimiser step, and the goldens were captured on another CPU,
# whose SIMD kernels sum in another order: on an AMD EPYC the toy's weights differ by up to 5.7e-5 (one of
# 4096) and the LoRA's by 1.0e-5. A real change is far larger: a learning rate 0.1% off moves the toy's
# weights by 3.6e-4 and its losses by 1e-3 (relative).
TRAINED_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# The training settings the goldens were captured with, where the defaults have moved since: every iteration
# rolled out the policy, the actions were independent draws, the clean estimate was the next state's.
CAPTURED_TRAINING = {"states": "rollouts", "antithetic": False, "x0_estimate": "next_state"}


@pytest.fixture(scope="module")
def golden():
    return load_file(DATA / "golden_behaviour.safetensors"), json.loads(
        (DATA / "golden_behaviour.json").read_text()
    )


@pytest.mark.parametrize(("method", "weights"), CASES, ids=[f"{m}-{w}" for m, w in CASES])
def test_composition_unchanged(golden, tiny_config, tiny_home, tiny_base_models, tiny_pipe, method, weights):
    """``msdda compose``'s core (``generate``, which the CLI, the flows and the benchmarks call) and
    ``MSDDAPipeline`` with the same seed: the golden images, NFE and rewards."""
    from composition.engine import generate, load_ensemble, score_generated

    tensors, scalars = golden
    key = f"{method}_{'_'.join(f'{w:g}' for w in weights)}"
    ensemble = load_ensemble(tiny_config, tiny_home, tiny_base_models)
    generated = generate(ensemble, method, weights, tiny_config.composition, num_images=8, seed=0)
    torch.testing.assert_close(generated.images, tensors[f"compose.{key}"], **TOLERANCE)
    assert generated.nfe_per_image == scalars[f"compose.{key}"]["nfe"]
    for name, values in score_generated(ensemble, generated).items():
        torch.testing.assert_close(
            values, torch.tensor(scalars[f"compose.{key}"]["rewards"][name]), **TOLERANCE
        )
    rewards = ensemble.objectives if method in ("code", "rgg") else None
    options = tiny_config.composition
    output = tiny_pipe(
        generated.prompts, weights, method, seed=0, output_type="pt", rewards=rewards, options=options
    )
    torch.testing.assert_close(output.images, tensors[f"compose.{key}"], **TOLERANCE)
    assert output.nfe == scalars[f"compose.{key}"]["nfe"]


def test_base_model_training_unchanged(golden, tiny_config, tiny_home, tiny_reference):
    """The trainer's rollouts, losses, updates and the evaluation chains, end to end on the tiny model."""
    from training.base_model import train_base_model
    from training.card import load_base_model

    tensors, scalars = golden
    # The goldens were captured with the trainer's settings of then, since changed by default.
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update=CAPTURED_TRAINING)})
    result = train_base_model(config, "ink_economy", tiny_home, progress=False)
    model = load_base_model(result.path)
    for key, value in model.lora.items():
        torch.testing.assert_close(value, tensors[f"train.lora.{key}"], **TRAINED_TOLERANCE)
    torch.testing.assert_close(model.log_variance, tensors["train.log_variance"], **TRAINED_TOLERANCE)
    expected = scalars["train.metrics"]
    # The rises divide a difference of two float32 mean rewards by a standard error far smaller than the
    # means: their resolution is the means' float32 rounding over that standard error (2e-3, 2.5e-5 here).
    rounding = torch.finfo(torch.float32).eps * abs(expected["reward_before"])
    unpaired_se = (expected["reward_se_before"] ** 2 + expected["reward_se_after"] ** 2) ** 0.5
    resolution = {
        "rise_in_se": rounding / expected["reward_se"],
        "rise_in_unpaired_se": rounding / unpaired_se,
    }
    for key, value in expected.items():
        assert getattr(result, key) == pytest.approx(value, rel=1e-4, abs=resolution.get(key, 1e-6)), key


def test_toy_training_unchanged(golden):
    from configs.schema import TrainConfig
    from training.analysis.toy import ToyProblem
    from training.trainer import train

    tensors, scalars = golden
    torch.manual_seed(0)
    toy = ToyProblem(num_inference_steps=5)
    config = TrainConfig(
        iterations=6,
        batch_size=16,
        states_per_trajectory=2,
        num_actions=8,
        learning_rate=1e-2,
        checkpoint_every=0,
        beta=1.0,
        **CAPTURED_TRAINING,
    )
    history = train(toy, config, None, progress=False).history
    for key, value in toy.trainable_state().items():
        torch.testing.assert_close(value, tensors[f"toy.{key}"], **TRAINED_TOLERANCE)
    for metrics, expected in zip(history, scalars["toy.history"]):
        assert metrics.loss == pytest.approx(expected["loss"], rel=1e-5)
        assert metrics.kl == pytest.approx(expected["kl"], rel=1e-5)
