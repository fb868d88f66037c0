"""Plain helpers shared by the test modules (fixtures live in ``tests/conftest.py``): commands run as a user
runs them, free ports, card and LoRA factories, and a UNet's inputs. One helper per kind, used everywhere."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MSDDA = [sys.executable, "-m", "flows.cli"]
"""The `msdda` console script, as this interpreter runs it (this checkout's code, through ``PYTHONPATH``)."""

# ------------------------------------------------------------------------------------------- subprocesses


def subprocess_env(
    *, without: Iterable[str] = (), without_prefixes: Iterable[str] = (), **settings: object
) -> dict[str, str]:
    """This process's environment for a command started from a test: the variables named in ``without`` and
    those starting with one of ``without_prefixes`` left out, this checkout on ``PYTHONPATH``, the hub
    offline, then ``settings``."""
    names, prefixes = set(without), tuple(without_prefixes)
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_msdda(
    args: list[str],
    cwd: Path,
    home: Path,
    *,
    timeout: float = 600,
    without: Iterable[str] = (),
    without_prefixes: Iterable[str] = (),
    **settings: object,
) -> subprocess.CompletedProcess:
    """`msdda ARGS` in a subprocess, as a user runs it, in ``cwd`` with ``home`` as ``MSDDA_HOME``, its own
    ``PREFECT_HOME`` (``cwd/prefect``) and no ``MLFLOW_TRACKING_URI`` unless ``settings`` give them; see
    :func:`subprocess_env` for ``without`` and ``without_prefixes``. Killed after ``timeout`` seconds."""
    env = subprocess_env(
        without={"MLFLOW_TRACKING_URI", *without},
        without_prefixes=without_prefixes,
        **{"MSDDA_HOME": home, "PREFECT_HOME": Path(cwd) / "prefect", **settings},
    )
    return subprocess.run(
        [*MSDDA, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def msdda_main(args: list[str], capfd) -> tuple[int, str, str]:
    """`msdda ARGS` in-process (``flows.cli.main``): ``(exit code, stdout, stderr)``, as ``capfd`` caught
    them (what was printed before is dropped)."""
    from flows.cli import main

    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


def run_python(
    args: list[str], env: dict[str, str], *, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python ARGS`` (this interpreter) in a subprocess with ``env``, its output caught as text; killed
    after ``timeout`` seconds. The exit code is the caller's to check."""
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_benchmark(script: str, args: list[str], home: Path, timeout: int):
    """Run a script of benchmarks/ as a user would, in an isolated home, and read its --json output."""
    out = run_python(
        [str(REPO / "benchmarks" / script), *args], subprocess_env(MSDDA_HOME=home), cwd=home, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------- cards and weights

CARD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.42.1",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def random_lora(
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA weights of the given ``shapes``, ``scale`` times standard normal draws (from ``generator``, or a
    new one seeded with ``seed``), drawn in the order of ``shapes``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(shape, generator=g) for k, shape in shapes.items()}


def lora_shapes(modules: Iterable[str], rank: int = 4, width: int = 8) -> dict[str, tuple[int, int]]:
    """The shapes of rank-``rank`` LoRA ``A`` and ``B`` matrices for ``width``-wide linear ``modules``."""
    shapes = {}
    for module in modules:
        shapes[f"{module}.lora_A.weight"] = (rank, width)
        shapes[f"{module}.lora_B.weight"] = (width, rank)
    return shapes


def make_card(objective: str = "ink_economy", **changes):
    """A complete ``BaseModelCard`` for ``objective`` (every field set, so a round trip checks them all),
    with ``changes`` applied."""
    from training.card import LORA_TARGETS, BaseModelCard, LoraSpec, RewardSpec

    fields = {
        "objective": objective,
        "reward": RewardSpec(
            name=objective, options={"weight": 1}, differentiable=True, model="tiny-classifier"
        ),
        "beta": 0.01,
        "trainer": "target_matching",
        "train": {"iterations": 2},
        "lora": LoraSpec(rank=4, targets=LORA_TARGETS),
        "learn_variance": "step",
        "reference_hash": "a" * 64,
        "reference": {"source": "embedded"},
        "scheduler": CARD_SCHEDULER,
        "sampling": {"num_inference_steps": 4, "eta": 1.0, "guidance_scale": 3.0},
        "metrics": {"reward_after": 0.5, "rise_in_se": math.inf},
        "history": [{"iteration": 1, "loss": 0.25}],
    }
    return BaseModelCard(**{**fields, **changes})


REGISTRY_SCHEDULER = {**CARD_SCHEDULER, "_diffusers_version": "0.35.0"}


def fake_card(
    objective: str,
    rise_in_se: float = 5.0,
    reference_hash: str = "ref-aaaa",
    scheduler: dict | None = None,
    kernel: dict | None = None,
):
    """A card as training writes it for the registry (:func:`make_card` with a trained model's metrics),
    whose metrics say ``rise_in_se``; ``kernel`` adds the kernel check's fields (and ``max_kernel_error`` goes
    to the card's ``train``)."""
    from training.card import LoraSpec, RewardSpec

    kernel = dict(kernel or {})
    train = {"max_kernel_error": kernel.pop("max_kernel_error")} if "max_kernel_error" in kernel else {}
    return make_card(
        objective,
        reward=RewardSpec(name=objective),
        beta=0.1,
        trainer="step_level",
        reference_hash=reference_hash,
        reference={},
        scheduler=scheduler or REGISTRY_SCHEDULER,
        sampling={"num_inference_steps": 4, "eta": 1.0, "guidance_scale": 1.0},
        lora=LoraSpec(rank=4, targets=["to_q"]),
        learn_variance="step",
        metrics={
            "objective": objective,
            "reward_before": 0.2,
            "reward_after": 0.2 + 0.01 * rise_in_se,
            "reward_se_before": 0.01,
            "reward_se_after": 0.01,
            "reward_se": 0.01,
            "rise_in_se": rise_in_se,
            "rise_in_unpaired_se": rise_in_se / 2,
            "kl": 0.05,
            "seconds": 1.0,
            "unet_evaluations": 10,
            **kernel,
        },
        train=train,
        history=[],
    )


def fake_weights(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Small random LoRA weights (one ``to_q``) and log-variance offsets."""
    generator = torch.Generator().manual_seed(seed)
    lora = random_lora(lora_shapes(["down_blocks.0.attn1.to_q"]), generator=generator)
    return lora, torch.randn(4, 1, generator=generator)


def fake_base_model(
    folder: Path,
    objective: str,
    seed: int,
    rise_in_se: float = 5.0,
    reference_hash: str = "ref-aaaa",
    scheduler: dict | None = None,
    kernel: dict | None = None,
) -> Path:
    """A base-model folder written by the card's ``save_base_model``, with small random weights."""
    from training.card import save_base_model

    return save_base_model(
        folder, fake_card(objective, rise_in_se, reference_hash, scheduler, kernel), *fake_weights(seed)
    )


def register_champions(home: Path, folders: Iterable[Path]) -> list[dict]:
    """Register each base-model folder in ``home``'s registry (its tracking store) as its objective's
    champion."""
    from flows.registry import register_base_model

    return [register_base_model(home, folder, champion=True) for folder in folders]


# ------------------------------------------------------------------------------------------ UNet inputs


def unet_inputs(unet, batch: int = 2, seed: int = 0, uncond: bool = False):
    """Random ``(x, t, context)`` for the tiny UNet (8x8 latents at t=500, 16 context tokens), drawn in that
    order from one generator seeded with ``seed``; ``uncond``: then one unconditional context, expanded to
    the batch, as a fourth item."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    x = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 16, dim, generator=g)
    t = torch.full((batch,), 500)
    if not uncond:
        return x, t, context
    return x, t, context, torch.randn(1, 16, dim, generator=g).expand(batch, -1, -1)
