"""``train.lora_targets``: named target sets and explicit module lists, resolved against the UNet, recorded on
the card, and refused in one line when they name nothing the UNet has."""

from __future__ import annotations

import pytest

from configs.schema import LORA_TARGET_SETS, ConfigError
from training.card import LORA_TARGETS, LoraSpec, LoraTargetError, check_adapted_modules


@pytest.fixture(scope="module")
def unet(tiny_reference):
    from training.reference.embedded import load_embedded_pipeline

    return load_embedded_pipeline(tiny_reference.path).unet


def _types(unet, modules):
    found = dict(unet.named_modules())
    return {type(found[m]).__name__ for m in modules}


def test_named_sets_resolve_to_the_unet_layers(unet):
    attention = LoraSpec.resolve(unet, "attention", rank=4)
    assert attention.target_set == "attention" and attention.targets == LORA_TARGETS
    assert attention.modules and all(
        m.rsplit(".", 2)[-2:][0].startswith(("to_", "attn")) for m in attention.modules
    )
    assert _types(unet, attention.modules) == {"Linear"}

    resnet = LoraSpec.resolve(unet, "attention_resnet", rank=4)
    assert set(attention.modules) < set(resnet.modules)
    assert "Conv2d" in _types(unet, resnet.modules), "the ResNet set adapts convolutions"
    assert any(m.endswith(".conv1") for m in resnet.modules)

    broad = LoraSpec.resolve(unet, "broad", rank=8)
    assert set(resnet.modules) < set(broad.modules)
    assert {"conv_in", "conv_out"} <= set(broad.modules)
    # a named set keeps only the names this UNet has; each kept name adapts at least one layer
    assert set(broad.targets) <= set(LORA_TARGET_SETS["broad"])


def test_explicit_lists(unet):
    custom = LoraSpec.resolve(unet, ["to_q", "conv1"], rank=2)
    assert custom.target_set == "custom" and custom.targets == ["to_q", "conv1"]
    assert all(m.endswith((".to_q", ".conv1")) for m in custom.modules)
    # a list that equals a named set is recorded under its name
    assert LoraSpec.resolve(unet, list(LORA_TARGET_SETS["attention"]), rank=2).target_set == "attention"


def test_misspelt_module_is_one_line_listing_the_valid_names(unet):
    with pytest.raises(LoraTargetError) as info:
        LoraSpec.resolve(unet, ["to_q", "con1"], rank=2)
    message = str(info.value)
    assert "\n" not in message and "'con1'" in message
    assert "attention_resnet" in message and "conv1" in message and "to_q" in message


def test_unknown_set_is_a_config_error():
    from configs import parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"train": {"lora_targets": "atention"}}, "x.yaml")
    assert "atention" in str(info.value) and "attention_resnet" in str(info.value)
    with pytest.raises(ConfigError):
        parse_config({"train": {"lora_targets": []}}, "x.yaml")


def test_cards_before_the_option_read_as_attention():
    spec = LoraSpec.model_validate({"rank": 4, "targets": LORA_TARGETS})
    assert spec.target_set == "attention" and spec.modules == []


def test_card_adapting_modules_the_reference_lacks_is_refused(unet):
    from tests.helpers import make_card

    spec = LoraSpec.resolve(unet, "attention", rank=4)
    check_adapted_modules(unet, make_card(lora=spec))  # its own reference: fine
    alien = spec.model_copy(update={"modules": [*spec.modules, "down_blocks.9.resnets.0.conv1"]})
    with pytest.raises(LoraTargetError, match="down_blocks.9.resnets.0.conv1"):
        check_adapted_modules(unet, make_card(lora=alien))
