"""How close is MSDDA sampling to the physical floor? Side by side, in one run, same batch and steps:

    python benchmarks/compose_speed.py [--batch-size 128] [--repeats 5] [--json]

* floor: the same UNet work on a plain UNet (no adapters), done the faster of two ways -- one forward of K * B
  rows per step, or K forwards of B rows (on a small CPU model the big batch is not always faster) -- the
  least any K-model composition can cost;
* MSDDA: the sampler (K adapters in one mixed-adapter batch, DDIM means, the closed form, the noise);
* sequential: the same chain, switching the active adapter K times per step (K forwards of B rows).

Prints ``msdda_over_floor`` (goal <= 1.10), ``compose_math_fraction`` (DDIM means + closed form over the whole
step; goal < 0.02), and the same figures for the sequential switches. Medians over --repeats chains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

from composition.engine import load_ensemble
from composition.methods import METHODS, Batch
from composition.msdda import compose_gaussian
from configs import load_config
from training.base_model import reference_identity, train_base_model
from training.kernel import GaussianStep
from training.models import msdda_home


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()

    config, home = load_config(args.config), msdda_home()
    # Training (on a fresh home) needs gradients: only the measurement below runs without them.
    base_dirs = [train_base_model(config, name, home, progress=False).path for name in config.objective_names]
    with torch.no_grad():
        report = measure(config, home, base_dirs, args.batch_size, args.repeats)
    if args.write_readme:
        write_section("compose-speed", render(report))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")


def measure(config, home, base_dirs, batch_size: int, repeats: int) -> dict:
    ensemble = load_ensemble(config, home, base_dirs)
    plain_unet = reference_identity(config, home, progress=False)[0].unet.eval()  # no adapters at all
    unet, schedule = ensemble.pipe.unet.eval(), ensemble.schedule
    k, b = len(ensemble.models), batch_size
    embeds_all, uncond = ensemble.embeddings()
    index = torch.arange(b) % len(ensemble.prompts)
    embeds = embeds_all[index]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn((b, *shape), generator=torch.Generator().manual_seed(0))
    weights = [1.0 / k] * k
    composer = ensemble.composer(config.composition)

    def floor_one_call():
        xs, context = x_T.repeat(k, 1, 1, 1), embeds.repeat(k, 1, 1)
        for step in range(len(schedule)):
            plain_unet(xs, schedule.timestep(step, xs), encoder_hidden_states=context)

    def floor_per_model():
        for step in range(len(schedule)):
            for _ in range(k):
                plain_unet(x_T, schedule.timestep(step, x_T), encoder_hidden_states=embeds)

    diagnostics = []

    def msdda():
        chain, _ = METHODS["msdda"].sample(
            composer, weights, x_T, Batch(embeds, uncond), torch.Generator().manual_seed(1)
        )
        diagnostics.append(chain.diagnostics)

    sequential_math = []

    def sequential():
        x, g = x_T, torch.Generator().manual_seed(1)
        math_seconds = 0.0
        for step in range(len(schedule)):
            t = schedule.timestep(step, x)
            eps = []
            for model in ensemble.models:
                unet.set_adapter(model.objective)
                eps.append(unet(x, t, encoder_hidden_states=embeds).sample)
            started = time.perf_counter()
            means = schedule.kernel(x.unsqueeze(0), torch.stack(eps), step).mean
            variances = torch.stack(
                [schedule.variance(step, x, m.log_variance).expand_as(x) for m in ensemble.models]
            )
            mean, var = compose_gaussian(means, variances, weights)
            math_seconds += time.perf_counter() - started
            x = GaussianStep(mean, var).sample(g)
        sequential_math.append(math_seconds)

    t_one_call = median_seconds(floor_one_call, repeats)
    t_per_model = median_seconds(floor_per_model, repeats)
    t_floor = min(t_one_call, t_per_model)
    t_msdda = median_seconds(msdda, repeats)
    t_sequential = median_seconds(sequential, repeats)
    compose_fraction = statistics.median(
        sum(d["compose_seconds"] for d in run) / sum(d["step_seconds"] for d in run)
        for run in diagnostics[1:]
    )
    return {
        "batch_size": b,
        "models": k,
        "steps": len(schedule),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "floor_one_call_seconds": t_one_call,
        "floor_per_model_seconds": t_per_model,
        "floor_seconds": t_floor,
        "msdda_seconds": t_msdda,
        "sequential_seconds": t_sequential,
        "msdda_over_floor": t_msdda / t_floor,
        "compose_math_fraction": compose_fraction,
        "sequential_over_floor": t_sequential / t_floor,
        "sequential_compose_math_fraction": statistics.median(sequential_math[1:]) / t_sequential,
        "msdda_over_sequential": t_msdda / t_sequential,
    }


def render(r: dict) -> str:
    return "\n".join(
        [
            f"`python benchmarks/compose_speed.py --write-readme`: {r['models']} base models, "
            f"batch {r['batch_size']}, {r['steps']} steps, median of {r['repeats']} chains, "
            f"{r['torch_threads']} torch threads, same run:",
            "",
            "| | seconds per chain | over the floor | composition maths share of a step |",
            "|---|---|---|---|",
            f"| floor: plain UNet, one call of K x B rows per step | {r['floor_one_call_seconds']:.3f} | "
            f"{r['floor_one_call_seconds'] / r['floor_seconds']:.3f} | |",
            f"| floor: plain UNet, K calls of B rows per step | {r['floor_per_model_seconds']:.3f} | "
            f"{r['floor_per_model_seconds'] / r['floor_seconds']:.3f} | |",
            f"| **MSDDA** (one mixed-adapter call per step) | {r['msdda_seconds']:.3f} | "
            f"**{r['msdda_over_floor']:.3f}** | **{r['compose_math_fraction']:.4f}** |",
            f"| K sequential adapter switches | {r['sequential_seconds']:.3f} | "
            f"{r['sequential_over_floor']:.3f} | {r['sequential_compose_math_fraction']:.4f} |",
            "",
            "Goals: MSDDA at most 1.10 times the floor (the faster of the two plain-UNet floors), "
            "composition maths under 2% of a step.",
        ]
    )


if __name__ == "__main__":
    main()
