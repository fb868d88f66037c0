"""``--set section.field=value``: the pure override function and its errors (configs/overrides.py)."""

import pytest

from configs import ConfigError, load_config, parse_config
from configs.overrides import OverrideError, apply_overrides, parse_override, source_of


def test_values_are_yaml_scalars_and_collections():
    assert parse_override("train.iterations=3").value == 3
    assert parse_override("train.beta=1e-3").path == ("train", "beta")
    assert parse_override("train.antithetic=true").value is True
    assert parse_override("composition.methods=[msdda, rs]").value == ["msdda", "rs"]
    assert parse_override("composition.beta=").value is None
    assert parse_override("train.prompts=[a=b]").value == ["a=b"], "only the first '=' splits"
    assert parse_override(" train . iterations = 4").path == ("train", "iterations")


def test_apply_overrides_is_pure_and_ordered():
    data = {"train": {"iterations": 5, "beta": 0.1}, "objectives": ["ink_economy"]}
    result = apply_overrides(
        data,
        [
            "train.iterations=7",
            "train.iterations=9",
            "model.embedded.image_size=24",
            "objectives=[symmetry, {name: ink_economy, beta: 0.05}]",
        ],
    )
    assert result == {
        "train": {"iterations": 9, "beta": 0.1},
        "model": {"embedded": {"image_size": 24}},
        "objectives": ["symmetry", {"name": "ink_economy", "beta": 0.05}],
    }
    assert data == {"train": {"iterations": 5, "beta": 0.1}, "objectives": ["ink_economy"]}, "unchanged"
    assert apply_overrides({"train": None}, ["train.iterations=2"]) == {"train": {"iterations": 2}}


def test_overrides_validate_with_the_schema(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iterations: 5\nobjectives: [digit_alignment]\n")
    config = load_config(path, ["train.iterations=2", "runtime.device=cpu", "composition.methods=[rs]"])
    assert config.train.iterations == 2 and config.runtime.device == "cpu"
    assert config.composition.methods == ["rs"] and config.objective_names == ["digit_alignment"]
    assert load_config(path).train.iterations == 5
    assert load_config(None, ["train.iterations=3"]).objective_names == ["digit_alignment", "ink_economy"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.iterations=abc"],
            "--set train.iterations=abc: train.iterations: Input should be a valid integer",
        ),
        (["train.iterationz=3"], "--set train.iterationz=3: train.iterationz: unknown field"),
        (["trian.iterations=3"], "--set trian.iterations=3: trian: unknown field"),
        (["train.iterations"], "--set train.iterations: expected section.field=value (no '=')"),
        (["=3"], "--set =3: expected section.field=value (empty field name"),
        (["train..beta=3"], "--set train..beta=3: expected section.field=value"),
        (["train.prompts=[a"], "--set train.prompts=[a: the value is not YAML"),
        (["train.beta.x=1"], "--set train.beta.x=1: train.beta is not a section"),
        (
            ["runtime.device=tpu"],
            "--set runtime.device=tpu: runtime.device: Input should be 'auto', 'cpu' or",
        ),
        (["train=5"], "--set train=5: train: Input should be a valid dictionary"),
        (
            ["model.source=pretrained"],
            "--set model.source=pretrained: model: Value error, source 'pretrained'",
        ),
        # the error names the override that set the bad field, not the last one given
        (["train.iterations=0", "composition.grid=5"], "--set train.iterations=0: train.iterations:"),
    ],
)
def test_override_errors_are_one_line_and_name_the_override(tmp_path, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_errors_of_the_file_still_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  guidence_scale: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: sampling.guidence_scale: unknown field"):
        load_config(path, ["train.iterations=2"])
    assert source_of(("sampling", "eta"), ["train.iterations=2"], "file") == "file"
    assert source_of((), ["train.iterations=2"], "file") == "file"
    assert issubclass(OverrideError, ConfigError)


def test_parse_config_takes_overrides_too():
    config = parse_config({"objectives": ["symmetry"]}, "<test>", ["sampling.eta=0.5"])
    assert config.sampling.eta == 0.5
