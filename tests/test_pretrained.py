"""`model.source: pretrained` end to end through the real CLI, offline: a small Stable-Diffusion-format
pipeline saved to a local folder is loaded by `msdda pretrain` (nothing trained), `msdda train` trains and
registers base models on it, and `msdda compose` composes them into images."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_CONFIG
from tests.helpers import run_msdda


@pytest.fixture
def sd_folder(tmp_path, tiny_reference) -> Path:
    """A plain diffusers ``StableDiffusionPipeline`` folder: the session's tiny reference without the files
    the embedded cache adds (its metadata and ``DONE`` marker)."""
    folder = tmp_path / "my_sd_model"
    shutil.copytree(tiny_reference.path, folder)
    for extra in ("DONE", "msdda_reference.json"):
        (folder / extra).unlink()
    return folder


def _config_file(tmp_path: Path, pretrained: str) -> Path:
    """The tiny config (every other section kept) with the reference taken from ``pretrained``."""
    data = copy.deepcopy(TINY_CONFIG)
    data["model"] = {**data["model"], "source": "pretrained", "pretrained": pretrained}
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli_json(args: list[str], tmp_path: Path, home: Path) -> dict:
    out = run_msdda([*args, "--json"], tmp_path, home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_pretrained_folder_pretrain_train_compose(tmp_path, sd_folder):
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from flows.registry import list_models
    from training.card import LORA_FILE, BaseModelCard
    from training.storage import content_hash

    # a plain diffusers folder: the stock loader takes it
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 16
    del pipe
    expected_hash = content_hash(sd_folder)
    before = {p: p.read_bytes() for p in sd_folder.rglob("*") if p.is_file()}

    home = tmp_path / "home"  # a fresh MSDDA_HOME: no reference, no classifier, empty MLflow store
    config = str(_config_file(tmp_path, str(sd_folder)))

    # pretrain: loads the checkpoint, trains nothing, and names it by its content hash
    loaded = _cli_json(["pretrain", "--config", config], tmp_path, home)
    assert loaded["source"] == "pretrained" and loaded["trained"] is False
    assert loaded["path"] == str(sd_folder.resolve())
    assert loaded["reference_hash"] == expected_hash
    assert "alignment_accuracy" not in loaded
    assert not (home / "reference").exists() and not (home / "classifiers").exists(), "nothing trained"

    # train: two iterations per objective, each registered as version 1 of its model
    results = {}
    for objective in ("digit_alignment", "ink_economy"):
        args = ["train", "--objective", objective, "--config", config, "--set", "train.iterations=2"]
        results[objective] = result = _cli_json(args, tmp_path, home)
        assert result["cached"] is False and result["registered"]["version"] == 1
        assert result["registered"]["name"] == f"msdda-{objective}"
        assert all(math.isfinite(result[k]) for k in ("reward_before", "reward_after", "kl"))
        folder = Path(result["path"])
        assert folder.is_relative_to(home / "base_models")
        card = BaseModelCard.read(folder)
        assert card.objective == objective and len(card.history) == 2
        assert card.reference_hash == expected_hash, "the card names the pretrained folder"
        lora = load_file(folder / LORA_FILE)
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items()), (
            "the LoRA moved from its zero initialisation"
        )
    registry = {row["name"]: row for row in list_models(home)}
    assert set(registry) == {"msdda-digit_alignment", "msdda-ink_economy"}
    assert all(row["reference_hash"] == expected_hash for row in registry.values())
    assert not (home / "reference").exists(), "the embedded reference was never built"

    # compose: the two registered versions, by name and version (neither need be champion after 2 iterations)
    out_dir = tmp_path / "images"
    models = "msdda-digit_alignment/1,msdda-ink_economy/1"
    args = ["compose", "-w", "0.5,0.5", "--models", models, "-n", "4", "--out", str(out_dir)]
    composed = _cli_json([*args, "--config", config], tmp_path, home)
    assert composed["num_images"] == 4 and composed["image_dir"] == str(out_dir)
    assert [(m["name"], m["version"]) for m in composed["models"]] == [
        ("msdda-digit_alignment", 1),
        ("msdda-ink_economy", 1),
    ]
    assert set(composed["rewards"]) == {"digit_alignment", "ink_economy"}
    assert all(math.isfinite(v) for v in composed["rewards"].values())
    assert composed["mlflow_run_id"]
    pngs = sorted(p for p in out_dir.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4 and (out_dir / "grid.png").is_file()
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (16, 16)

    after = {p: p.read_bytes() for p in sd_folder.rglob("*") if p.is_file()}
    assert after == before, "the checkpoint folder is only read"
    assert not (home / "reference").exists()


@pytest.mark.parametrize("command", ["pretrain", "train"])
def test_missing_pretrained_folder_is_one_line_exit_2(tmp_path, command):
    """`pretrain` and `train` on a `source: pretrained` config whose folder is missing (`run` is in
    test_cli.py): one line naming the folder, exit 2, nothing written to MSDDA_HOME."""
    config = str(_config_file(tmp_path, str(tmp_path / "no_such_model")))
    args = {"pretrain": ["pretrain"], "train": ["train", "--objective", "digit_alignment"]}[command]
    result = run_msdda([*args, "--config", config], tmp_path, tmp_path / "home")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "no_such_model" in result.stderr
    assert "does not exist" in result.stderr and result.stdout == ""
    assert not (tmp_path / "home").exists(), "the checkpoint is checked before any work"
