from pathlib import Path

import pytest
import yaml

from configs import DEFAULT_CONFIG, ConfigError, load_config, parse_config


def test_default_config_is_the_embedded_default():
    config = load_config()
    assert config.model.source == "embedded"
    assert config.sampling.eta > 0
    assert config.objective_names == ["digit_alignment", "ink_economy"]


def test_default_config_only_states_what_differs_from_the_schema():
    """configs/default.yaml holds the objectives and nothing else: the effective default config is the
    schema's defaults plus those objectives (so the two cannot drift apart)."""
    from configs.schema import PipelineConfig

    raw = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    assert set(raw) == {"objectives"}, "every other default lives in configs/schema.py"
    assert load_config() == PipelineConfig(objectives=raw["objectives"])
    assert load_config() != PipelineConfig(), "the objectives do differ from the schema's (empty) default"


def test_default_config_commented_examples_are_valid():
    """The commented overrides at the end of configs/default.yaml, uncommented, validate."""
    lines = Path(DEFAULT_CONFIG).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Common overrides"))
    example = "\n".join(line[2:] for line in lines[start + 1 :] if line.startswith("# "))
    data = yaml.safe_load(example)
    assert {"model", "pretrain", "sampling", "train", "composition", "objectives"} <= set(data)
    config = parse_config(data, "configs/default.yaml (examples)")
    assert config.model.source == "pretrained" and config.sampling.guidance_scale == 7.5
    assert config.objective("ink_economy").beta == 0.05


def test_objectives_accept_names_and_mappings():
    config = parse_config({"objectives": ["a", {"name": "b", "options": {"k": 1}}]})
    assert config.objective_names == ["a", "b"]
    assert config.objectives[1].options == {"k": 1}


def test_objective_train_overrides_apply_to_their_objective_only():
    from training.base_model import run_key

    ink = {"name": "ink_economy", "train": {"gradient_proposal": 1.0, "antithetic": True}}
    config = parse_config({"train": {"iterations": 7}, "objectives": ["digit_alignment", ink]})
    assert config.train_for("ink_economy").gradient_proposal == 1.0
    assert config.train_for("ink_economy").iterations == 7, "the rest comes from the train section"
    assert config.train_for("digit_alignment") == config.train
    assert config.for_objective("ink_economy").train.antithetic
    plain = parse_config({"train": {"iterations": 7}, "objectives": ["digit_alignment", "ink_economy"]})
    assert run_key(config, "digit_alignment", "ref") == run_key(plain, "digit_alignment", "ref")
    assert run_key(config, "ink_economy", "ref") != run_key(plain, "ink_economy", "ref")


@pytest.mark.parametrize(
    ("train", "start", "phrase"),
    [
        ("{gradient_proposl: 1}", "objectives.1.train:", "unknown train field gradient_proposl"),
        ("{antithetic: true, num_actions: 3}", "<root>:", "objective ink_economy: train: "),
        ("{gradient_proposal: -1}", "<root>:", "objective ink_economy: train.gradient_proposal: "),
    ],
)
def test_objective_train_override_errors_are_one_line(tmp_path, train, start, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(f"objectives:\n  - digit_alignment\n  - {{name: ink_economy, train: {train}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {start}") and phrase in message and "\n" not in message, message


def test_sd15_example_validates():
    config = load_config(Path(DEFAULT_CONFIG).with_name("sd15.yaml"))
    assert config.model.source == "pretrained"
    assert "stable-diffusion-v1-5" in config.model.pretrained


@pytest.mark.parametrize("name", sorted(p.name for p in Path(DEFAULT_CONFIG).parent.glob("*.yaml")))
def test_shipped_configs_name_registered_rewards(name):
    from training.rewards import REWARDS

    config = load_config(Path(DEFAULT_CONFIG).with_name(name))
    unknown = [n for n in config.objective_names if n not in REWARDS]
    assert not unknown, f"{name} names objectives no reward is registered for: {unknown}"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("pretrain:\n  unet_stepz: 3\n", "pretrain.unet_stepz"),
        ("sampling:\n  eta: -1\n", "sampling.eta"),
        ("model:\n  embedded:\n    image_size: 12\n", "model.embedded.image_size"),
        ("bogus: 1\n", "bogus"),
        ("model:\n  source: pretrained\n", "model"),
        ("objectives:\n  - {options: {}}\n", "objectives.0.name"),
        ("train:\n  antithetic: true\n  num_actions: 7\n", "train"),
        # the probe: diffusers' own architecture check, at pretraining, used to be cut off and exit 1
        ("model:\n  embedded:\n    text_heads: 3\n", "model.embedded"),
    ],
)
def test_bad_fields_are_named_with_the_file(tmp_path, yaml_text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}:"), message
    assert "\n" not in message


def test_unknown_field_says_so(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampling:\n  guidence_scale: 2\n")
    with pytest.raises(ConfigError, match=r"sampling\.guidence_scale: unknown field"):
        load_config(path)


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_nesting_past_the_recursion_limit_is_a_config_error(tmp_path):
    """YAML (or data) nested a few thousand levels deep exhausts Python's recursion in the YAML reader or in
    copying the data for ``--set``: a one-line :class:`ConfigError`, not a ``RecursionError``."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  prompts: " + "[" * 3000 + "]" * 3000)
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply to read"):
        load_config(deep)
    options: object = 1
    for _ in range(5000):
        options = {"b": options}
    with pytest.raises(ConfigError, match="<data>: nested too deeply to read"):
        parse_config({"objectives": [{"name": "x", "options": options}]}, "<data>", ["train.iterations=3"])
