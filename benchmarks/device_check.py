"""Which stages run on a device today? Each stage on the tiny embedded model, with its one-line outcome:

    python benchmarks/device_check.py --device cuda [--json]

Stages: pretraining (the embedded model, 20 steps), the step-level trainer (3 iterations per default
objective, the problem moved to the device by the trainer itself), evaluation sampling on the device, and
composition with every registered method (the reference pipeline moved to the device). A stage that fails
prints the exception's type and first line and where it was raised; the script goes on to the next stage. It
measures and prints; the device plumbing itself is tracked as a project issue, this is the check that says how
far it got.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

TINY = {
    "model": {
        "embedded": {
            "image_size": 16,
            "vae_channels": [8, 16],
            "unet_channels": [16, 32],
            "text_hidden_size": 16,
            "text_layers": 1,
            "text_heads": 2,
        }
    },
    "pretrain": {
        "vae_steps": 20,
        "unet_steps": 30,
        "batch_size": 16,
        "classifier_steps": 40,
        "eval_samples": 20,
    },
    "sampling": {"num_inference_steps": 4},
    "train": {
        "iterations": 3,
        "batch_size": 4,
        "states_per_trajectory": 2,
        "num_actions": 2,
        "eval_samples": 8,
        "checkpoint_every": 0,
    },
    "composition": {"num_images": 4, "grid": 3, "code_block": 2},
    "objectives": ["digit_alignment", "ink_economy"],
}


def stage(name: str, results: list, fn) -> object:
    started = time.perf_counter()
    try:
        value = fn()
        results.append({"stage": name, "ok": True, "seconds": round(time.perf_counter() - started, 2)})
        return value
    except Exception as exc:  # noqa: BLE001 - a check reports every failure and goes on
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        results.append(
            {
                "stage": name,
                "ok": False,
                "error": f"{type(exc).__name__}: {first}",
                "at": f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})",
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    from composition.engine import generate, load_ensemble
    from composition.methods import METHODS
    from configs import parse_config
    from training.base_model import train_base_model
    from training.embedded import pretrain_reference

    config = parse_config(TINY, "device_check")
    home = Path(tempfile.mkdtemp(prefix="device-check-"))
    results: list[dict] = []
    stage("pretrain (embedded)", results, lambda: pretrain_reference(config, home, progress=False))
    models = []
    for objective in config.objective_names:  # the trainer moves the problem to accelerate's device
        path = stage(
            f"train + evaluate {objective} (3 iterations)",
            results,
            lambda objective=objective: train_base_model(config, objective, home, progress=False).path,
        )
        models.append(path)
    if None in models:
        models = stage("random base models instead (CPU)", results, lambda: random_base_models(config, home))
    if models:
        ensemble = stage(
            "load ensemble, pipeline moved to the device",
            results,
            lambda: moved(load_ensemble(config, home, models), device),
        )
        for method in METHODS if ensemble is not None else []:
            stage(
                f"compose {method}",
                results,
                lambda method=method: generate(
                    ensemble, method, [0.5, 0.5], config.composition, num_images=4
                ),
            )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "stages": results}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"device: {device_name}, torch {torch.__version__}")
        for r in results:
            status = "ok  " if r["ok"] else "FAIL"
            print(f"{status} {r['stage']:48s} {r['seconds']:7.2f}s  {r.get('error', '')} {r.get('at', '')}")
    sys.exit(0)


def moved(ensemble, device):
    ensemble.pipe.to(device)
    return ensemble


def random_base_models(config, home: Path) -> list[Path]:
    """Two base models with random LoRA weights, saved with the card (as the tests' fixture does)."""
    from peft import get_peft_model_state_dict

    from training.base_model import evaluation_problem
    from training.card import LORA_TARGETS, BaseModelCard, LoraSpec, RewardSpec, save_base_model
    from training.embedded import pretrain_reference
    from training.models import content_hash

    problem = evaluation_problem(config, home, None)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(problem.unet, adapter_name="default").items()}
    folders = []
    for i, objective in enumerate(config.objective_names):
        g = torch.Generator().manual_seed(i)
        card = BaseModelCard(
            objective=objective,
            reward=RewardSpec(name=objective),
            beta=0.01,
            trainer="random",
            lora=LoraSpec(rank=4, targets=LORA_TARGETS),
            learn_variance="step",
            reference_hash=content_hash(pretrain_reference(config, home, progress=False).path),
            scheduler=dict(problem.pipe.scheduler.config),
            sampling=config.sampling.model_dump(),
        )
        lora = {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}
        folders.append(save_base_model(home / "random" / objective, card, lora, torch.zeros(4, 1)))
    return folders


if __name__ == "__main__":
    main()
