"""The rewards registry: offline rewards, differentiability, and one-line errors for what is missing."""

import pytest
import torch

from training.rewards import REWARDS, RewardError, load_reward, prompted_digit


def images(n=4, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_offline_and_heavy_rewards():
    assert {"digit_alignment", "ink_economy", "symmetry", "compressibility"} <= REWARDS.keys()
    assert {"image_reward", "laion_aesthetic", "pickscore", "clip_score", "hpsv2"} <= REWARDS.keys()


@pytest.mark.parametrize(
    ("name", "differentiable"), [("ink_economy", True), ("symmetry", True), ("compressibility", False)]
)
def test_simple_rewards(tiny_config, tmp_path, name, differentiable):
    reward = load_reward(name, tiny_config, tmp_path)
    assert reward.differentiable is differentiable
    x = images().requires_grad_(differentiable)
    values = reward(x, ["a handwritten digit one"] * 4)
    assert values.shape == (4,) and torch.isfinite(values).all()
    if differentiable:
        values.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_ink_and_compressibility_order_blank_above_noise(tiny_config, tmp_path):
    blank, noisy = torch.zeros(1, 3, 16, 16), images(1)
    for name in ("ink_economy", "compressibility"):
        reward = load_reward(name, tiny_config, tmp_path)
        assert reward(blank, ["x"]) > reward(noisy, ["x"])


def test_digit_alignment_is_a_log_probability(tiny_config, tmp_path):
    reward = load_reward("digit_alignment", tiny_config, tmp_path)
    assert reward.differentiable and "classifier_test_accuracy" in reward.info
    values = reward(
        images(),
        [
            "a handwritten digit seven",
            "handwritten two",
            "the digit nine written by hand",
            "a picture of the number zero",
        ],
    )
    assert (values <= 0).all()
    assert prompted_digit("a hand drawn number eight") == 8
    with pytest.raises(RewardError, match="names a digit"):
        reward(images(1), ["a cat"])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("no_such_reward", {}, "unknown objective 'no_such_reward'; known:"),
        ("clip_score", {}, "needs `options.weights`"),
        ("pickscore", {"weights": "/nonexistent/pickscore"}, "weights not found at /nonexistent/pickscore"),
        ("laion_aesthetic", {}, "needs `options.head`"),
        ("clip_score", {"weights": "openai/clip-vit-base-patch32"}, "cannot load weights"),
    ],
)
def test_missing_rewards_and_weights_fail_in_one_line(
    tiny_config, tmp_path, monkeypatch, name, options, message
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RewardError) as info:
        load_reward(name, tiny_config, tmp_path, options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plugin_without_its_package_names_it(tiny_config, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as if the optional package were not installed
    with pytest.raises(RewardError, match="pip install image-reward"):
        load_reward("image_reward", tiny_config, tmp_path, {"weights": str(tmp_path)})


def test_prototype_match_is_a_curved_reward_peaking_at_the_prototype(tiny_config, tmp_path):
    reward = load_reward("prototype_match", tiny_config, tmp_path, {"sharpness": 2.0})
    assert reward.differentiable and reward.info == {"sharpness": 2.0}
    prompts = ["a handwritten digit one", "a handwritten digit seven"]
    x = images(2).requires_grad_(True)
    values = reward(x, prompts)
    values.sum().backward()
    assert (values < 0).all() and x.grad.abs().sum() > 0
    # at the prompted digit's mean training image the reward is 0, its maximum
    from training.reference.digits import train_test_split

    size = tiny_config.model.embedded.image_size
    train, _ = train_test_split(size, tiny_config.pretrain.test_fraction, seed=0)
    one = train.images[train.labels == 1].mean(0).expand(3, -1, -1).unsqueeze(0)
    assert float(reward(one, prompts[:1])) == pytest.approx(0.0, abs=1e-4)
    doubled = load_reward("prototype_match", tiny_config, tmp_path, {"sharpness": 4.0})(x.detach(), prompts)
    torch.testing.assert_close(doubled, 2 * values.detach())  # sharpness scales the curvature
    with pytest.raises(RewardError, match="sharpness"):
        load_reward("prototype_match", tiny_config, tmp_path, {"sharpness": -1})


def test_weighted_sum_is_the_combined_reward(tiny_config, tmp_path):
    images = torch.rand(3, 3, 16, 16)
    prompts = ["a handwritten digit one"] * 3
    combined = load_reward(
        "weighted_sum", tiny_config, tmp_path, {"terms": {"ink_economy": 0.25, "symmetry": 0.75}}
    )
    expected = 0.25 * load_reward("ink_economy", tiny_config, tmp_path)(images, prompts) + 0.75 * load_reward(
        "symmetry", tiny_config, tmp_path
    )(images, prompts)
    torch.testing.assert_close(combined(images, prompts), expected)
    assert combined.differentiable
    with pytest.raises(RewardError, match="options.terms"):
        load_reward("weighted_sum", tiny_config, tmp_path, {})


def test_an_objectives_scale_divides_its_reward_everywhere_it_is_trained(tiny_config, tmp_path):
    from configs import parse_config
    from training.base_model import run_key
    from training.rewards import objective_reward

    scaled = parse_config(
        {
            "objectives": [{"name": "ink_economy", "scale": 0.5}, "symmetry"],
            "model": tiny_config.model.model_dump(),
        }
    )
    x, prompts = images(3), ["a handwritten digit one"] * 3
    raw = load_reward("ink_economy", scaled, tmp_path)(x, prompts)
    torch.testing.assert_close(objective_reward("ink_economy", scaled, tmp_path)(x, prompts), raw / 0.5)
    combined = load_reward("weighted_sum", scaled, tmp_path, {"terms": {"ink_economy": 0.3, "symmetry": 0.7}})
    symmetry = load_reward("symmetry", scaled, tmp_path)(x, prompts)
    torch.testing.assert_close(combined(x, prompts), 0.3 * raw / 0.5 + 0.7 * symmetry)
    # the default scale leaves cache keys as they were; another scale is another model
    plain = parse_config({"objectives": ["ink_economy"]})
    assert run_key(plain, "ink_economy", "ref") == run_key(
        parse_config({"objectives": [{"name": "ink_economy", "scale": 1.0}]}), "ink_economy", "ref"
    )
    assert run_key(plain, "ink_economy", "ref") != run_key(scaled, "ink_economy", "ref")
    paired = parse_config({"objectives": ["ink_economy"], "train": {"antithetic": True}})
    assert run_key(plain, "ink_economy", "ref") != run_key(paired, "ink_economy", "ref")
