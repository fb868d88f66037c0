"""Pretraining and training speed on the CPU, idle and beside CPU-bound processes, per thread setting:

    python benchmarks/threads_under_load.py [--busy 0,2] [--settings default,auto,1,passive] [--steps 12]
        [--json] [--write-docs]

Each measurement runs in a fresh process (OpenMP reads its settings when torch loads), while ``--busy`` other
processes spin (``while True: pass``) beside it. The stages, on the embedded default's shapes
(``configs/default.yaml``):

* ``autoencoder`` and ``denoiser``: ``--steps`` steps of ``training.reference.embedded``'s pretraining
  loops, from randomly initialised components (the speed of a step does not depend on the weights);
* ``train``: the step-level trainer (``training.base_model.train_base_model``) for ``ink_economy`` on the same
  randomly initialised model, saved as a checkpoint folder and loaded as ``model.source: pretrained``.

Seconds per iteration are medians over the iterations after the first two. ``--write-docs`` puts the table
in ``docs/operations.md`` and the JSON in ``benchmarks/results/threads_under_load.json``. The thread settings:

* ``default``: what the CLI did before issue 20 (torch's own choice: one thread per core);
* ``auto``: :func:`training.device.configure_threads` (what the CLI does now);
* a number: that many torch threads;
* ``passive``: torch's own choice with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of
  spinning);
* ``dask-trim``: one thread with ``MALLOC_TRIM_THRESHOLD_=65536``, the environment a Dask nanny gives its
  workers by default (``distributed.nanny.pre-spawn-environ``); glibc then returns freed memory to the OS at
  once. Every other setting runs with glibc's default.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "operations.md"
RESULTS = REPO / "benchmarks" / "results" / "threads_under_load.json"
STAGES = ("autoencoder", "denoiser", "train")


def _rates(stamps: list[float]) -> float:
    """Median seconds per iteration from the end time of each iteration, skipping the first two."""
    gaps = [b - a for a, b in itertools.pairwise(stamps[2:])]
    return statistics.median(gaps) if gaps else float("nan")


class _StampedBar:
    """Stands in for the pretraining loops' tqdm bar: records when each iteration ends, prints nothing."""

    def __init__(self, stamps: list[float], iterable, *args, **kwargs) -> None:
        self.stamps, self.iterable = stamps, iterable

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.stamps.append(time.perf_counter())

    def set_postfix(self, *args, **kwargs) -> None:
        pass


def worker(setting: str, steps: int) -> dict:
    """One measurement, in this process: the three stages' median seconds per iteration."""
    import torch

    from configs import load_config
    from training.base_model import train_base_model
    from training.device import configure_threads
    from training.reference import embedded

    if setting == "auto":
        configure_threads(0)
    elif setting.isdigit() or setting == "dask-trim":
        torch.set_num_threads(1 if setting == "dask-trim" else int(setting))
    config = load_config(None)
    pretrain = config.pretrain.model_copy(update={"vae_steps": steps, "unet_steps": steps})
    components = embedded.build_components(config.model.embedded)
    generator = torch.Generator().manual_seed(0)
    size = config.model.embedded.image_size
    images = torch.rand(256, 1, size, size, generator=generator)
    labels = torch.randint(0, 10, (256,), generator=generator)
    result = {"threads": torch.get_num_threads()}

    original_tqdm = embedded.tqdm
    for stage in ("autoencoder", "denoiser"):
        stamps: list[float] = []
        embedded.tqdm = functools.partial(_StampedBar, stamps)
        try:
            if stage == "autoencoder":
                latents = embedded.train_vae(components["vae"], images, pretrain, generator, False)
            else:
                embedded.train_denoiser(components, latents, labels, pretrain, generator, False)
        finally:
            embedded.tqdm = original_tqdm
        result[stage] = _rates(stamps)

    with tempfile.TemporaryDirectory() as folder:
        embedded.save_pipeline(components, Path(folder) / "reference")
        train_config = config.model_copy(
            update={
                "model": config.model.model_copy(
                    update={"source": "pretrained", "pretrained": str(Path(folder) / "reference")}
                ),
                "train": config.train.model_copy(
                    update={"iterations": steps, "eval_samples": 8, "checkpoint_every": 0}
                ),
            }
        )
        stamps = []
        train_base_model(
            train_config,
            "ink_economy",
            Path(folder) / "home",
            progress=False,
            log_metrics=lambda _: stamps.append(time.perf_counter()),
        )
        result["train"] = _rates(stamps)
    return result


def measure(setting: str, busy: int, steps: int) -> dict:
    """Run :func:`worker` in a fresh process beside ``busy`` spinning processes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if setting == "dask-trim":
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", setting, "--steps", str(steps)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return {"setting": setting, "busy": busy, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,2", help="numbers of spinning processes beside the run")
    parser.add_argument("--settings", default="default,auto,1,passive")
    parser.add_argument("--steps", type=int, default=12, help="iterations per stage")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/operations.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    rows = []
    for busy in [int(b) for b in args.busy.split(",")]:
        for setting in args.settings.split(","):
            row = measure(setting, busy, args.steps)
            rows.append(row)
            print(
                f"busy={busy} {setting:>8} threads={row['threads']}: "
                + ", ".join(
                    f"{stage} {row[stage]:.3f} s/it" for stage in ("autoencoder", "denoiser", "train")
                ),
                file=sys.stderr,
                flush=True,
            )
    cpus = len(os.sched_getaffinity(0))
    summary = {"cpus": cpus, "steps": args.steps, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        print(json.dumps(summary, indent=1))
    print(table(summary), file=sys.stderr)
    if args.write_docs:
        from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

        from training.storage import atomic_file

        with atomic_file(RESULTS) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        write_section("threads-under-load", table(summary), target=DOCS)


def table(summary: dict) -> str:
    """Markdown: seconds per iteration of each stage, per load and setting, and each over torch's default."""
    lines = [
        "| spinning processes beside it | threads setting | torch threads | "
        + " | ".join(f"{stage} s/it (over default)" for stage in STAGES)
        + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    for row in summary["rows"]:
        default = next(
            (r for r in summary["rows"] if r["busy"] == row["busy"] and r["setting"] == "default"), None
        )
        cells = [
            f"{row[stage]:.3f}" + (f" ({row[stage] / default[stage]:.2f})" if default else "")
            for stage in STAGES
        ]
        lines.append(f"| {row['busy']} | {row['setting']} | {row['threads']} | " + " | ".join(cells) + " |")
    lines.append(
        f"\n{summary['cpus']} CPUs, {summary['steps']} iterations per stage, {summary['date']}: "
        "`python benchmarks/threads_under_load.py --write-docs`."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
