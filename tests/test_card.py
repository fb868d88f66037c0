"""The base-model card: save/load round trip, format-1 folders, one-line errors, lineage checks, and that the
saved LoRA is a standard diffusers LoRA (``StableDiffusionPipeline.load_lora_weights`` applies it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import CARD_SCHEDULER as SCHEDULER
from tests.helpers import lora_shapes, make_card, random_lora
from training.card import (
    CARD_FILE,
    FORMAT_VERSION,
    LEGACY_LORA_FILE,
    LORA_FILE,
    LORA_TARGETS,
    VARIANCE_FILE,
    BaseModelCard,
    CardError,
    LoadedBaseModel,
    LoraSpec,
    RewardScale,
    check_lineage,
    load_base_model,
    save_base_model,
    scheduler_identity,
)

MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
]


def card_lora(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """Random rank-``rank`` LoRA weights on ``MODULES``."""
    return random_lora(lora_shapes(MODULES, rank), seed)


def saved(tmp_path: Path, name: str = "m", **changes) -> Path:
    return save_base_model(tmp_path / name, make_card(**changes), card_lora(), torch.full((4, 1), 0.3))


def one_line_card_error(call) -> str:
    with pytest.raises(CardError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    card, lora, log_variance = make_card(), card_lora(), torch.randn(4, 1)
    folder = save_base_model(tmp_path / "m", card, lora, log_variance)
    assert folder == tmp_path / "m"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_FILE, LORA_FILE, VARIANCE_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no temporary folder left behind"

    loaded = load_base_model(folder)
    assert isinstance(loaded, LoadedBaseModel) and loaded.path == folder
    assert loaded.card.weights_sha256.keys() == {LORA_FILE, VARIANCE_FILE}  # recorded on saving
    assert loaded.card.model_copy(update={"weights_sha256": {}}) == card
    assert loaded.card.format_version == FORMAT_VERSION
    assert loaded.card.metrics["rise_in_se"] == math.inf and loaded.card.reward.model_extra == {
        "model": "tiny-classifier"
    }
    assert loaded.lora.keys() == lora.keys() and all(torch.equal(loaded.lora[k], lora[k]) for k in lora)
    assert torch.equal(loaded.log_variance, log_variance)
    assert (loaded.objective, loaded.beta, loaded.rank, loaded.targets) == (
        "ink_economy",
        0.01,
        4,
        LORA_TARGETS,
    )

    raw = load_file(folder / LORA_FILE)  # the diffusers format: prefixed keys, LoraConfig kwargs as metadata
    assert sorted(raw) == sorted(f"unet.{k}" for k in lora)
    with safe_open(folder / LORA_FILE, "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata == {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": LORA_TARGETS}


def test_no_variance_and_reading_the_card_alone(tmp_path):
    folder = save_base_model(tmp_path / "m", make_card(learn_variance="none"), card_lora(), None)
    assert not (folder / VARIANCE_FILE).exists()
    assert load_base_model(folder).log_variance is None
    card = BaseModelCard.read(folder)
    assert card.model_copy(update={"weights_sha256": {}}) == make_card(learn_variance="none")


def test_legacy_format_1_folder_loads(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    lora, log_variance = card_lora(), torch.randn(4, 1)
    save_file(lora, folder / LEGACY_LORA_FILE)
    save_file({"log_variance": log_variance}, folder / VARIANCE_FILE)
    meta = {  # exactly what training.base_model.save_base_model wrote before the card
        "objective": "ink_economy",
        "reward": {"name": "ink_economy", "options": {}, "differentiable": True, "description": "less ink"},
        "beta": 0.01,
        "trainer": "target_matching",
        "train": {"iterations": 2},
        "lora": {"rank": 4, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "learn_variance": "step",
        "reference_hash": "b" * 64,
        "reference": {"source": "embedded"},
        "scheduler": SCHEDULER,
        "sampling": {"num_inference_steps": 4},
        "metrics": {"reward_after": 0.1, "rise_in_se": 4.0},
        "history": [{"iteration": 1, "loss": 0.5}],
    }
    (folder / CARD_FILE).write_text(json.dumps(meta, indent=2))
    loaded = load_base_model(folder)
    assert (
        loaded.card.format_version == 1 and loaded.card.lora.alpha is None and loaded.card.lora.scaling == 1.0
    )
    assert loaded.card.reward.model_extra == {"description": "less ink"}
    assert all(torch.equal(loaded.lora[k], lora[k]) for k in lora) and torch.equal(
        loaded.log_variance, log_variance
    )

    resaved = save_base_model(tmp_path / "new", loaded.card, loaded.lora, loaded.log_variance)  # upgrades it
    assert load_base_model(resaved).card.format_version == FORMAT_VERSION and (resaved / LORA_FILE).exists()


# -------------------------------------------------------------------------------------------- broken folders


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _edit_card(**changes):
    def edit(folder: Path) -> None:
        data = json.loads((folder / CARD_FILE).read_text())
        (folder / CARD_FILE).write_text(json.dumps({**data, **changes}))

    return edit


BROKEN = {
    "card missing": (lambda folder: (folder / CARD_FILE).unlink(), f"{CARD_FILE} is missing"),
    "card not json": (_write(CARD_FILE, b"{not json"), "is not valid JSON"),
    "card not an object": (_write(CARD_FILE, b"[1, 2]"), "holds a list"),
    "negative beta": (_edit_card(beta=-1.0), "beta: Input should be greater than 0"),
    "unknown key": (_edit_card(surprise=1), "surprise: Extra inputs are not permitted"),
    "lora missing": (lambda folder: (folder / LORA_FILE).unlink(), f"{LORA_FILE} is missing"),
    "lora garbage": (_write(LORA_FILE, b"not a safetensors file"), "not a readable safetensors file"),
    "lora truncated": (
        lambda folder: (folder / LORA_FILE).write_bytes((folder / LORA_FILE).read_bytes()[:60]),
        "not a readable safetensors file",
    ),
    "lora empty": (lambda folder: save_file({}, folder / LORA_FILE), "LoRA weights are empty"),
    "lora not finite": (
        lambda folder: save_file(
            {f"unet.{MODULES[0]}.lora_A.weight": torch.full((4, 8), math.nan)}, folder / LORA_FILE
        ),
        "is not finite",
    ),
    "lora without prefix": (
        lambda folder: save_file(card_lora(), folder / LORA_FILE),
        "non-UNet LoRA keys",
    ),
    "lora of another rank": (
        lambda folder: save_file({f"unet.{k}": v for k, v in card_lora(rank=2).items()}, folder / LORA_FILE),
        "has rank 2, the card says 4",
    ),
    "variance missing": (lambda folder: (folder / VARIANCE_FILE).unlink(), f"{VARIANCE_FILE} is missing"),
    "variance without key": (
        lambda folder: save_file({"x": torch.zeros(4, 1)}, folder / VARIANCE_FILE),
        "has no 'log_variance'",
    ),
    "variance of wrong shape": (
        lambda folder: save_file({"log_variance": torch.zeros(4)}, folder / VARIANCE_FILE),
        "expected [steps, channels]",
    ),
    "variance not finite": (
        lambda folder: save_file({"log_variance": torch.full((4, 1), math.inf)}, folder / VARIANCE_FILE),
        "log_variance is not finite",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_folder_is_a_one_line_card_error(tmp_path, case):
    folder = saved(tmp_path)
    damage, fragment = BROKEN[case]
    damage(folder)
    message = one_line_card_error(lambda: load_base_model(folder))
    assert str(folder) in message and fragment in message, message
    assert "retrain it with `msdda train --objective" in message, message


def test_newer_format_says_to_update(tmp_path):
    folder = saved(tmp_path)
    _edit_card(format_version=FORMAT_VERSION + 1)(folder)
    message = one_line_card_error(lambda: BaseModelCard.read(folder))
    assert f"card format {FORMAT_VERSION + 1}" in message and "update msdda" in message


def test_card_error_is_an_msdda_error():
    from configs.errors import MsddaError

    assert issubclass(CardError, MsddaError) and issubclass(CardError, ValueError)


def test_save_refuses_bad_weights_and_writes_nothing(tmp_path):
    bad = {**card_lora(), f"{MODULES[0]}.lora_A.weight": torch.full((4, 8), math.nan)}
    message = one_line_card_error(lambda: save_base_model(tmp_path / "m", make_card(), bad, None))
    assert "not finite" in message and "'ink_economy'" in message
    one_line_card_error(lambda: save_base_model(tmp_path / "m", make_card(), {}, None))
    outside = {"mid_block.conv.lora_A.weight": torch.zeros(4, 8)}
    assert "outside the card's targets" in one_line_card_error(
        lambda: save_base_model(tmp_path / "m", make_card(), outside, None)
    )
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------- lineage


def loaded(objective: str, path: str = "", **changes) -> LoadedBaseModel:
    return LoadedBaseModel(
        Path(path or f"/models/{objective}"), make_card(objective, **changes), card_lora(), None
    )


def test_lineage_accepts_shared_reference_and_scheduler():
    newer_diffusers = {**SCHEDULER, "_diffusers_version": "0.99.0"}
    check_lineage([loaded("ink_economy"), loaded("digit_alignment", scheduler=newer_diffusers)])
    check_lineage([loaded("ink_economy")], reference_hash="a" * 64)
    assert make_card().lineage() == {"reference_hash": "a" * 64, "scheduler": scheduler_identity(SCHEDULER)}


def test_lineage_mismatch_messages():
    ink, digit = loaded("ink_economy"), loaded("digit_alignment")
    other_ref = loaded("other_ref", reference_hash="b" * 64)
    message = one_line_card_error(lambda: check_lineage([ink, digit, other_ref]))
    assert message == (
        "base models 'ink_economy' (/models/ink_economy) and 'other_ref' (/models/other_ref) were "
        "trained on different reference models (reference_hash aaaaaaaaaaaa vs bbbbbbbbbbbb): they "
        "cannot be composed"
    )

    other_sched = loaded(
        "other_sched", scheduler={**SCHEDULER, "beta_schedule": "linear", "clip_sample": True}
    )
    message = one_line_card_error(lambda: check_lineage([digit, other_sched]))
    assert "'digit_alignment' (/models/digit_alignment) and 'other_sched' (/models/other_sched)" in message
    assert "different scheduler configs (differing: beta_schedule, clip_sample)" in message

    message = one_line_card_error(lambda: check_lineage([ink, digit], reference_hash="c" * 64))
    assert message == (
        "base model 'ink_economy' (/models/ink_economy) was trained on reference aaaaaaaaaaaa, but "
        "this config's reference is cccccccccccc"
    )

    twice = loaded("ink_economy", path="/elsewhere/ink")
    message = one_line_card_error(lambda: check_lineage([ink, digit, twice]))
    assert message == (
        "the objective 'ink_economy' appears twice among the base models (/models/ink_economy and "
        "/elsewhere/ink)"
    )
    assert one_line_card_error(lambda: check_lineage([])) == "no base models to compose"


def test_scheduler_identity_drops_bookkeeping_keys():
    assert scheduler_identity(SCHEDULER) == {k: v for k, v in SCHEDULER.items() if k != "_diffusers_version"}
    assert scheduler_identity(None) == {}


# ------------------------------------------------------------------------------------------- small pieces


def test_reward_scale_and_lora_scaling():
    rewards = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(RewardScale().standardise(rewards), rewards)
    assert torch.allclose(
        RewardScale(offset=1.0, scale=2.0).standardise(rewards), torch.tensor([0.0, 0.5, 1.5])
    )
    with pytest.raises(ValueError):
        RewardScale(scale=0.0)
    assert LoraSpec(rank=4, targets=["to_q"]).scaling == 1.0
    assert LoraSpec(rank=4, alpha=8, targets=["to_q"]).scaling == 2.0
    with pytest.raises(ValueError):
        LoraSpec(rank=0, targets=["to_q"])
    assert make_card().reward_scale == RewardScale()


# ------------------------------------------------------------------------------------- diffusers interop


@torch.no_grad()
@pytest.mark.parametrize("target_set", ["attention", "broad"])
def test_diffusers_load_lora_weights_applies_the_saved_adapter(tiny_reference, tmp_path, target_set):
    """The saved folder is a standard diffusers LoRA: ``pipe.load_lora_weights(folder)`` on a fresh reference
    gives the same UNet output as our adapter loaded with peft (same weights, same alpha/rank scaling), for
    the attention projections and for a set that adapts the convolutions too."""
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

    from training.reference.embedded import load_embedded_pipeline

    ours = load_embedded_pipeline(tiny_reference.path)
    spec = LoraSpec.resolve(
        ours.unet, target_set, rank=4, alpha=8.0
    )  # scaling 2: the metadata must carry alpha
    ours.unet.add_adapter(LoraConfig(**spec.lora_config_kwargs()), adapter_name="ours")
    g = torch.Generator().manual_seed(0)
    lora = {
        k: 0.2 * torch.randn(v.shape, generator=g)
        for k, v in get_peft_model_state_dict(ours.unet, adapter_name="ours").items()
    }
    set_peft_model_state_dict(ours.unet, lora, adapter_name="ours")
    folder = save_base_model(tmp_path / "m", make_card(lora=spec, learn_variance="none"), lora, None)

    theirs = load_embedded_pipeline(tiny_reference.path)
    theirs.load_lora_weights(folder)
    plain = load_embedded_pipeline(tiny_reference.path)

    config = plain.unet.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=g)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, config.cross_attention_dim, generator=g)
    out = {
        name: pipe.unet(x, t, encoder_hidden_states=context).sample
        for name, pipe in (("ours", ours), ("theirs", theirs), ("plain", plain))
    }
    assert (out["ours"] - out["plain"]).abs().max() > 1e-2, "the adapter changes the output"
    torch.testing.assert_close(out["theirs"], out["ours"], rtol=1e-5, atol=1e-5)
    assert load_base_model(folder).lora.keys() == lora.keys()
