"""Which stages run on a device today? Each stage on the tiny embedded model, with its one-line outcome:

    python benchmarks/device_check.py --device cuda [--dtype fp16] [--json]

Stages, each placed by the config's ``runtime`` section (``--device``/``--dtype`` set it): pretraining (the
tiny model of configs/tiny.yaml), the step-level trainer (3 iterations per default objective) with its
evaluation sampling, and composition with every registered method (skipped when a training stage failed).
A stage that fails prints the exception's type and first line and where it was raised; the script goes on
to the next stage. It measures and prints: it says how far the device plumbing gets.
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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from composition.engine import generate, load_ensemble
    from composition.methods import METHODS
    from configs import DEFAULT_CONFIG, load_config
    from training.base_model import train_base_model
    from training.device import DeviceError, resolve_runtime
    from training.reference.embedded import pretrain_reference

    config = load_config(DEFAULT_CONFIG.with_name("tiny.yaml"))
    config = config.model_copy(
        update={
            "train": config.train.model_copy(update={"iterations": 3, "checkpoint_every": 0}),
            "runtime": config.runtime.model_copy(update={"device": args.device, "dtype": args.dtype}),
        }
    )
    try:
        device, _ = resolve_runtime(config.runtime)
    except DeviceError as exc:  # cuda without CUDA: one line, exit 2 (as the CLI does)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    home = Path(tempfile.mkdtemp(prefix="device-check-"))
    results: list[dict] = []
    stage("pretrain (embedded)", results, lambda: pretrain_reference(config, home, progress=False))
    models = []
    for objective in config.objective_names:
        path = stage(
            f"train + evaluate {objective} (3 iterations)",
            results,
            lambda objective=objective: train_base_model(config, objective, home, progress=False).path,
        )
        models.append(path)
    models = [m for m in models if m is not None]
    if len(models) == len(config.objective_names):  # composition needs the trained base models
        ensemble = stage(
            f"load ensemble ({args.dtype} on the device)",
            results,
            lambda: load_ensemble(config, home, models),
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
    report = {"device": device_name, "dtype": args.dtype, "torch": torch.__version__, "stages": results}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"device: {device_name}, torch {torch.__version__}")
        for r in results:
            status = "ok  " if r["ok"] else "FAIL"
            print(f"{status} {r['stage']:48s} {r['seconds']:7.2f}s  {r.get('error', '')} {r.get('at', '')}")
    sys.exit(0)


if __name__ == "__main__":
    main()
