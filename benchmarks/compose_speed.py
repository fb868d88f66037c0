"""How close is MSDDA sampling to the physical floor? Side by side, in one run, same batch and steps:

    python benchmarks/compose_speed.py [--batches 128] [--repeats 5] [--device auto] [--modes eager] [--json]
        [--lora-targets attention,attention_resnet,broad]
    python benchmarks/compose_speed.py --unet sd15 --device cuda --dtype fp16 [--batches 1,4,16,32]
        [--models 2,3] [--modes eager,compiled] [--repeats 15] --json

``--unet embedded`` (default): the config's base models on its reference (trained first on a fresh home),
whole chains, per batch size:

* floor: the same UNet work on a plain UNet (no adapters), done the faster of two ways -- one forward of K * B
  rows per step, or K forwards of B rows (on a small CPU model the big batch is not always faster) -- the
  least any K-model composition can cost;
* MSDDA: the sampler (DDIM means, the closed form, the noise) with each plan (``composition.plan``): one
  routed call of K * B rows, or K routed calls of B rows; ``msdda_seconds`` is the configured plan's
  (``auto``: K calls on the CPU, one call on a GPU), with the configured ``composition.routed_weights``;
* sequential: the same chain, switching the active adapter K times per step (K forwards of B rows; eager
  mode only).

Prints ``msdda_over_floor`` (goal <= 1.10), ``compose_math_fraction`` (DDIM means + closed form over the whole
step; goal < 0.02), and the same figures for the sequential switches. Medians over --repeats chains.

``--lora-targets SET,...``: the same figures for base models adapting each target set
(``train.lora_targets``; the config's own first). The config's own set uses its trained models; for another
set, speed does not depend on the adapter's values, so its models are trained for one iteration (two
evaluation samples): the same layers, ranks and routing as fully trained ones, at a fraction of the cost.

``--unet sd15``: a randomly initialised ``UNet2DConditionModel`` with Stable Diffusion 1.5's config (860 M
parameters, 64x64 latents, 77x768 text states; no weights needed) carrying K rank-4 LoRA adapters on
``to_q, to_k, to_v, to_out.0``; milliseconds per denoising step (median of --repeats), for each batch B and
each K, of the floors (one plain UNet call of K * B rows; K plain calls of B rows) and of the routed variants
(``--routings``; ``mixed_adapter_batch`` entered every step, as the sampler does): ``routed_merged`` and
``routed_lora`` (one routed call of K * B rows with merged weights or LoRA deltas) and ``per_model_merged``
(K routed calls of B rows). Each ``*_over_floor`` is over the faster floor.

``--modes eager,compiled`` measures each mode against the floor in the same mode: eager against eager,
compiled (``composition.batched.compile_unet``: ``torch.compile``, CUDA graphs on a GPU) against compiled.
The first compiled call of each shape compiles (tens of seconds on a GPU, minutes on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

from composition.batched import compile_unet, lora_layers, mixed_adapter_batch, routing
from composition.engine import load_ensemble, sample_batch
from composition.methods import METHODS, Batch
from composition.msdda import compose_gaussian
from configs import load_config
from configs.schema import LORA_TARGET_SETS
from training.base_model import train_base_model
from training.device import place_pipeline, resolve_device, resolve_dtype, resolve_runtime
from training.reference.loader import reference_pipeline
from training.step.kernel import GaussianStep
from training.storage import msdda_home


def interleaved_medians(fns: dict, repeats: int, device: torch.device, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each of ``fns`` (CUDA synchronised), after ``warmup`` calls of each, over
    ``repeats`` rounds that call every function once in turn: a machine that speeds up or slows down during
    the run moves every variant alike, so the ratios hold."""

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for fn in fns.values():
        for _ in range(warmup):
            timed(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--unet", choices=["embedded", "sd15"], default="embedded")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument(
        "--batches", default=None, help="batch sizes B (default: 128 embedded, 1,4,16,32 sd15)"
    )
    parser.add_argument("--models", default="2,3", help="sd15: adapter counts K (embedded: the config's)")
    parser.add_argument("--modes", default="eager", help="eager, compiled or eager,compiled")
    parser.add_argument(
        "--routings",
        default="merged,lora,per_model",
        help="sd15: routed variants to time (merged, lora, per_model)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--lora-targets",
        default=None,
        help="embedded: target sets to time, e.g. attention,attention_resnet,broad (default: the config's)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--write-readme", action="store_true", help="write the table into the docs (docs/performance.md)"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="sd15: write the docs table of a report saved earlier (on a GPU machine); measures nothing",
    )
    parser.add_argument(
        "--section", default="compose-speed-sd15", help="the docs/performance.md block --from-json writes"
    )
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        if report.get("unet") != "sd15":
            parser.error(f"{args.from_json} is not an sd15 report")
        write_section(args.section, render_sd15(report, args.from_json))
        return
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"eager", "compiled"}:
        parser.error(f"--modes takes eager and/or compiled, got {args.modes}")
    device = resolve_device(args.device)
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape and routing

    if args.unet == "sd15":
        batches = _numbers(args.batches or "1,4,16,32")
        report = measure_sd15(device, resolve_dtype(args.dtype), batches, _numbers(args.models), modes, args)
    else:
        config, home = load_config(args.config), msdda_home()
        runtime = config.runtime.model_copy(update={"device": args.device, "dtype": args.dtype})
        config = config.model_copy(update={"runtime": runtime})
        results = []
        for target_set in _target_sets(config, args.lora_targets, parser):
            set_config = _with_targets(config, target_set)
            # Training (on a fresh home) needs gradients: only the measurement below runs without them.
            base_dirs = [
                train_base_model(set_config, name, home, progress=False).path
                for name in set_config.objective_names
            ]
            with torch.no_grad():
                results += [
                    {
                        "target_set": target_set,
                        **measure(set_config, home, base_dirs, b, args.repeats, compiled=mode == "compiled"),
                    }
                    for mode in modes
                    for b in _numbers(args.batches or "128")
                ]
        report = {"unet": "embedded", "results": results}
    report = {"device": device_name(device), "dtype": args.dtype, "torch": torch.__version__, **report}
    if args.write_readme:
        if args.unet != "embedded" or modes != ["eager"]:
            parser.error("--write-readme writes the embedded eager table only")
        write_section("compose-speed", render(report["results"]))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"device: {report['device']}, dtype {args.dtype}, torch {torch.__version__}")
        for row in report["results"]:
            print(json.dumps(row))


def _target_sets(config, text: str | None, parser) -> list[str]:
    """``--lora-targets``: the config's own set first, then the others named (each once)."""
    own = config.train.lora_targets
    own = own if isinstance(own, str) else "custom"
    named = [t.strip() for t in (text or own).split(",") if t.strip()]
    unknown = [t for t in named if t not in LORA_TARGET_SETS and t != own]
    if unknown:
        parser.error(
            f"--lora-targets takes sets of {', '.join(LORA_TARGET_SETS)}; unknown: {', '.join(unknown)}"
        )
    return [own] + [t for t in dict.fromkeys(named) if t != own]


def _with_targets(config, target_set: str):
    """``config`` with its base models adapting ``target_set``; for a set that is not the config's own,
    trained for one iteration (module docstring: the structure is what is timed)."""
    if target_set == config.train.lora_targets or target_set == "custom":
        return config
    update = {"lora_targets": target_set, "iterations": 1, "eval_samples": 2, "checkpoint_every": 1}
    objectives = [o.model_copy(update={"train": {**o.train, **update}}) for o in config.objectives]
    return config.model_copy(
        update={"train": config.train.model_copy(update=update), "objectives": objectives}
    )


def _adapted_layers(unet, adapter: str) -> int:
    """How many of ``unet``'s LoRA layers (:func:`~composition.batched.lora_layers`) carry ``adapter``."""
    return sum(1 for m in lora_layers(unet) if adapter in m.lora_A)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measure(config, home, base_dirs, batch_size: int, repeats: int, compiled: bool = False) -> dict:
    """Whole chains on the embedded model (see the module docstring); ``compiled``: the composer's and the
    floor's UNets compiled (``composition.compile``)."""
    ensemble = load_ensemble(config, home, base_dirs)  # placed on runtime.device in runtime.dtype
    device, dtype = resolve_runtime(config.runtime)
    plain_pipe = reference_pipeline(config, home, progress=False)[0]  # no adapters at all
    plain_unet = place_pipeline(plain_pipe, device, dtype).unet.eval()
    plain = compile_unet(plain_unet) if compiled else plain_unet
    unet, schedule = ensemble.pipe.unet.eval(), ensemble.schedule
    k, b = len(ensemble.models), batch_size
    embeds_all, uncond = ensemble.embeddings()
    index = torch.arange(b) % len(ensemble.prompts)
    embeds = embeds_all[index]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn((b, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    weights = [1.0 / k] * k
    options = config.composition.model_copy(update={"compile": compiled})
    composers = {
        plan: ensemble.composer(options.model_copy(update={"plan": plan}))
        for plan in ("one_call", "per_model")
    }
    chosen = ensemble.composer(options).plan  # what the config's plan (auto: by device) runs
    warmup = 3 if compiled else 1  # compiling, then recording CUDA graphs

    def floor_one_call():
        xs, context = x_T.repeat(k, 1, 1, 1).to(dtype), embeds.repeat(k, 1, 1).to(dtype)
        for step in range(len(schedule)):
            plain(xs, schedule.timestep(step, xs), encoder_hidden_states=context)

    def floor_per_model():
        x, context = x_T.to(dtype), embeds.to(dtype)
        for step in range(len(schedule)):
            for _ in range(k):
                plain(x, schedule.timestep(step, x), encoder_hidden_states=context)

    diagnostics = {plan: [] for plan in composers}

    def msdda(plan):
        def run():
            generator = torch.Generator().manual_seed(1)
            batch = Batch(embeds, uncond)  # composition's one core, latents only (no decode)
            chain, _, _ = sample_batch(
                composers[plan], METHODS["msdda"], weights, x_T, batch, generator, None, None
            )
            diagnostics[plan].append(chain.diagnostics)

        return run

    sequential_math = []

    def sequential():
        x, g = x_T, torch.Generator().manual_seed(1)
        math_seconds = 0.0
        for step in range(len(schedule)):
            t = schedule.timestep(step, x)
            eps = []
            for model in ensemble.models:
                unet.set_adapter(model.objective)
                eps.append(unet(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype)).sample.float())
            started = time.perf_counter()
            means = schedule.kernel(x.unsqueeze(0), torch.stack(eps), step).mean
            variances = torch.stack(
                [schedule.variance(step, x, m.log_variance).expand_as(x) for m in ensemble.models]
            )
            mean, var = compose_gaussian(means, variances, weights)
            math_seconds += time.perf_counter() - started
            x = GaussianStep(mean, var).sample(g)
        sequential_math.append(math_seconds)

    variants = {"one_call": floor_one_call, "per_model": floor_per_model}
    variants.update({f"msdda_{plan}": msdda(plan) for plan in composers})
    if not compiled:  # adapter switches recompile a compiled UNet: eager only
        variants["sequential"] = sequential
    times = interleaved_medians(variants, repeats, device, warmup)
    t_one_call, t_per_model = times["one_call"], times["per_model"]
    t_floor = min(t_one_call, t_per_model)
    t_plans = {plan: times[f"msdda_{plan}"] for plan in composers}
    t_msdda = t_plans[chosen]
    compose_fraction = statistics.median(
        sum(d["compose_seconds"] for d in run) / sum(d["step_seconds"] for d in run)
        for run in diagnostics[chosen][warmup:]
    )
    report = {
        "mode": "compiled" if compiled else "eager",
        "batch_size": b,
        "models": k,
        "steps": len(schedule),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "adapted_layers": _adapted_layers(unet, ensemble.models[0].objective),
        "floor_one_call_seconds": t_one_call,
        "floor_per_model_seconds": t_per_model,
        "floor_seconds": t_floor,
        "plan": chosen,
        "routed_weights": options.routed_weights,
        "msdda_one_call_seconds": t_plans["one_call"],
        "msdda_per_model_seconds": t_plans["per_model"],
        "msdda_seconds": t_msdda,
        "msdda_over_floor": t_msdda / t_floor,
        "compose_math_fraction": compose_fraction,
    }
    if not compiled:  # adapter switches recompile a compiled UNet: eager only
        t_sequential = times["sequential"]
        report.update(
            sequential_seconds=t_sequential,
            sequential_over_floor=t_sequential / t_floor,
            sequential_compose_math_fraction=statistics.median(sequential_math[1:]) / t_sequential,
            msdda_over_sequential=t_msdda / t_sequential,
        )
    return report


SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}
"""``runwayml/stable-diffusion-v1-5``'s ``unet/config.json`` (the fields that are not diffusers' defaults)."""
SD15_TEXT = (77, 768)
LORA_TARGETS_SD = ["to_q", "to_k", "to_v", "to_out.0"]


def sd15_unets(num_adapters: int, device: torch.device, dtype: torch.dtype):
    """``(plain, with_adapters)``: the SD-1.5-shaped UNet, randomly initialised, on ``device`` in ``dtype``,
    and a copy carrying ``num_adapters`` random rank-4 LoRA adapters ``m0, m1, ...``."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**SD15_UNET).to(device=device, dtype=dtype).eval().requires_grad_(False)
    unet = copy.deepcopy(plain)
    for i in range(num_adapters):
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS_SD)
        unet.add_adapter(config, adapter_name=f"m{i}")
    return plain, unet.to(device=device, dtype=dtype).requires_grad_(False)


@torch.no_grad()
def measure_sd15(device, dtype, batches: list[int], models: list[int], modes: list[str], args) -> dict:
    """ms per denoising step of the floors and the routed variants, per mode, K and B (module docstring)."""
    plain, unet = sd15_unets(max(models), device, dtype)
    parameters = sum(p.numel() for p in plain.parameters())
    routings = [r.strip() for r in args.routings.split(",")]
    results = []
    for mode in modes:
        compiled = mode == "compiled"
        floor_fn = compile_unet(plain) if compiled else plain
        routed_fn = compile_unet(unet) if compiled else unet
        warmup = 3 if compiled else 2
        for k in models:
            names = [f"m{i}" for i in range(k)]
            for b in batches:
                times = step_milliseconds(
                    floor_fn, routed_fn, unet, names, b, routings, device, dtype, args.repeats, warmup
                )
                floor = min(times["floor_one_call"], times.get("floor_per_model", float("inf")))
                row = {"mode": mode, "models": k, "batch_size": b}
                row.update({f"{name}_ms": round(ms, 3) for name, ms in times.items()})
                row.update({f"{name}_over_floor": round(ms / floor, 4) for name, ms in times.items()})
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)  # progress, kept if killed
    return {"unet": "sd15", "parameters": parameters, "repeats": args.repeats, "results": results}


def step_milliseconds(floor_fn, routed_fn, unet, names, b, routings, device, dtype, repeats, warmup) -> dict:
    """ms per step for K = ``len(names)`` models on ``b`` rows each: the floors (one plain call of ``K b``
    rows; K plain calls of ``b`` rows) and each routing in ``routings``: ``merged``/``lora`` (one routed
    call of ``K b`` rows, the block entered every step, as the sampler does) and ``per_model`` (K routed
    calls of ``b`` rows with merged weights: the per-model plan)."""
    g = torch.Generator().manual_seed(len(names) * b)
    k = len(names)
    x = torch.randn((k * b, 4, 64, 64), generator=g).to(device=device, dtype=dtype)
    context = torch.randn((k * b, *SD15_TEXT), generator=g).to(device=device, dtype=dtype)
    t = torch.full((k * b,), 500, device=device)

    def floor_one_call():
        floor_fn(x, t, encoder_hidden_states=context)

    def floor_per_model():
        for i in range(k):
            floor_fn(x[i * b : (i + 1) * b], t[:b], encoder_hidden_states=context[i * b : (i + 1) * b])

    def one_call(weights):
        def run():
            with mixed_adapter_batch(unet, routing(names, b), weights):
                routed_fn(x, t, encoder_hidden_states=context)

        return run

    def per_model():
        for i, name in enumerate(names):
            with mixed_adapter_batch(unet, routing([name], b), "merged"):
                routed_fn(x[i * b : (i + 1) * b], t[:b], encoder_hidden_states=context[i * b : (i + 1) * b])

    variants = {"floor_one_call": floor_one_call}
    if "per_model" in routings:
        variants["floor_per_model"] = floor_per_model
    for weights in ("merged", "lora"):
        if weights in routings:
            variants[f"routed_{weights}"] = one_call(weights)
    if "per_model" in routings:
        variants["per_model_merged"] = per_model
    seconds = interleaved_medians(variants, repeats, device, warmup)
    return {name: 1000 * value for name, value in seconds.items()}


SD15_COLUMNS = {
    "floor_one_call": "floor: one plain call of K·B rows",
    "floor_per_model": "floor: K plain calls of B rows",
    "routed_merged": "**MSDDA step: one routed call, merged weights** (default)",
    "routed_lora": "one routed call, LoRA deltas",
    "per_model_merged": "K routed calls of B rows, merged weights",
}


def render_sd15(report: dict, source: str) -> str:
    """The SD-1.5-scale table: ms per step and the ratio over the faster floor, per mode, K and B."""
    results = report["results"]
    columns = [c for c in SD15_COLUMNS if f"{c}_ms" in results[0]]
    floor = "faster floor" if "floor_per_model" in columns else "floor (one plain call of K·B rows)"
    lines = [
        f"`{source}`: `compose_speed.py --unet sd15`, {report['device']}, {report['dtype']}, torch "
        f"{report['torch']}, {report['parameters'] / 1e6:.0f} M-parameter UNet, milliseconds per denoising "
        f"step (median of {report['repeats']}) and, in brackets, the ratio over the {floor}:",
        "",
        "| mode | K | B | " + " | ".join(SD15_COLUMNS[c] for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for r in results:
        cells = [f"{r[f'{c}_ms']:.1f} ({r[f'{c}_over_floor']:.2f})" for c in columns]
        lines.append(f"| {r['mode']} | {r['models']} | {r['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    """The docs table of the first result (the config's own target set) and, when several sets were
    measured, one row per set."""
    if len(results) == 1:
        return _render_one(results[0], "python benchmarks/compose_speed.py --write-readme")
    sets = ",".join(r["target_set"] for r in results)
    lines = [
        _render_one(results[0], f"python benchmarks/compose_speed.py --lora-targets {sets} --write-readme"),
        "",
        "Per LoRA target set (`--lora-targets`; same run, same batch):",
        "",
        "| target set | adapted layers | floor (s) | MSDDA as configured (s) | over the floor | "
        "sequential over the floor |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| `{r['target_set']}` | {r['adapted_layers']} | {r['floor_seconds']:.3f} | "
        f"{r['msdda_seconds']:.3f} | **{r['msdda_over_floor']:.3f}** | {r['sequential_over_floor']:.3f} |"
        for r in results
    ]
    return "\n".join(lines)


def _render_one(r: dict, command: str) -> str:
    return "\n".join(
        [
            f"`{command}`: {r['models']} base models, "
            f"batch {r['batch_size']}, {r['steps']} steps, median of {r['repeats']} chains, "
            f"{r['torch_threads']} torch threads, same run:",
            "",
            "| | seconds per chain | over the floor | composition maths share of a step |",
            "|---|---|---|---|",
            f"| floor: plain UNet, one call of K x B rows per step | {r['floor_one_call_seconds']:.3f} | "
            f"{r['floor_one_call_seconds'] / r['floor_seconds']:.3f} | |",
            f"| floor: plain UNet, K calls of B rows per step | {r['floor_per_model_seconds']:.3f} | "
            f"{r['floor_per_model_seconds'] / r['floor_seconds']:.3f} | |",
            f"| MSDDA, one routed call of K x B rows per step | {r['msdda_one_call_seconds']:.3f} | "
            f"{r['msdda_one_call_seconds'] / r['floor_seconds']:.3f} | |",
            f"| MSDDA, K routed calls of B rows per step | {r['msdda_per_model_seconds']:.3f} | "
            f"{r['msdda_per_model_seconds'] / r['floor_seconds']:.3f} | |",
            f"| **MSDDA** as configured (plan `auto`: {r['plan'].replace('_', ' ')}; "
            f"{r['routed_weights']} weights) | {r['msdda_seconds']:.3f} | "
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
