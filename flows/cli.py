"""The ``msdda`` command line.

Every subcommand takes ``--json`` and then prints a single JSON object on stdout (progress goes to stderr).
Bad input exits with code 2 and a one-line ``error: ...`` on stderr, without a traceback.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from composition.methods import DEFAULT_METHOD, MethodName
from configs.errors import MsddaError
from configs.schema import MAX_PROMPT_CHARS, Device
from flows.deploy import DEFAULT_CRON
from flows.jobs import MAX_IMAGES, Runner, quiet_libraries
from flows.ui import DEFAULT_HOST, DEFAULT_PORT
from training.rewards import RewardName

app = typer.Typer(
    name="msdda",
    help="Multi-objective alignment of diffusion models: step-level RL base models composed with MSDDA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: the embedded default).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        help="Override one config field, on top of the YAML (repeatable; the value is YAML), "
        "e.g. --set train.iterations=50 --set composition.grid=5.",
    ),
]
DeviceOption = Annotated[
    Device | None,
    typer.Option(
        "--device",
        help="Where the models run: auto (CUDA if there is one), cpu or cuda. Shorthand for "
        "--set runtime.device=...; default: the config's (auto).",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"msdda {version('msdda')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Print the full traceback of a failure instead of one line and a log file "
            "(as MSDDA_DEBUG=1 does).",
        ),
    ] = False,
) -> None:
    """Multi-objective alignment of diffusion models: step-level RL base models composed with MSDDA."""


class UsageError(MsddaError):
    """Bad user input: reported as one line on stderr with exit code 2."""


PRIVATE_DEFAULTS = {
    "DO_NOT_TRACK": "true",  # Prefect's SDK telemetry (and MLflow's)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the Prefect server's telemetry heartbeat
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
"""Telemetry of Prefect and MLflow is off unless the user's environment sets these otherwise
(docs/operations.md)."""


def _private_by_default() -> None:
    import os

    for name, value in PRIVATE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _quiet_upload_bars() -> None:
    """Keep MLflow's upload bars off the terminal; our own bars stay.

    Warnings are not silenced process-wide: the library warnings that the commands meet are filtered where
    they arise, by message, category and module (peft's notes on several adapters in one model:
    ``composition.batched.load_adapter`` and ``composition.pipeline``), and any other one is shown."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _quiet_libraries() -> None:
    """Keep diffusers' and transformers' chatter (log lines, load bars) off the terminal, and tracebacks off
    Prefect's console. Called once the input is checked: importing them takes seconds, which bad input should
    not wait for."""
    from flows.failures import console_without_tracebacks

    quiet_libraries()
    console_without_tracebacks()


def _overrides(sets: list[str] | None, device: str | None) -> list[str]:
    """The ``--set`` strings in order, then ``--device`` as ``runtime.device=...`` (so it wins)."""
    return [*(sets or []), *([f"runtime.device={device}"] if device else [])]


def _config(config_path: Path | None, sets: list[str] | None = None, device: str | None = None):
    """What every command with model work does first: the config (YAML, then the overrides) validated, and
    its device checked, so that bad input fails in one line before any work; then torch's threads set
    (``runtime.num_threads``) and the libraries quieted.
    Returns the config and the overrides (for flows that load the config again)."""
    from configs import load_config
    from training.device import configure_threads, resolve_device

    overrides = _overrides(sets, device)
    config = load_config(config_path, overrides)
    resolve_device(config.runtime.device)
    configure_threads(config.runtime.num_threads)
    _quiet_libraries()
    return config, overrides


def _emit(payload: dict, as_json: bool, human: str) -> None:
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        typer.echo(human)


@app.command()
def pretrain(
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Build the embedded reference model (cached under $MSDDA_HOME) and report its quality; with
    `model.source: pretrained`, only load the checkpoint (nothing is trained) and report its content hash."""
    from training.reference.loader import prepare_reference
    from training.storage import msdda_home

    cfg, _ = _config(config, overrides, device)
    start = time.perf_counter()
    # a missing or broken checkpoint fails here, in one line
    reference = prepare_reference(cfg, msdda_home(), progress=sys.stderr.isatty() or not json_output)
    payload = {**reference, "seconds": round(time.perf_counter() - start, 3)}
    if reference["source"] == "pretrained":
        human = (
            f"reference model: {reference['path']} (pretrained checkpoint: loaded, nothing trained)\n"
            f"reference hash: {reference['reference_hash']}\n"
            f"loaded in {payload['seconds']:.1f} s"
        )
    else:
        human = (
            f"reference model: {reference['path']}\n"
            f"alignment accuracy: {reference['alignment_accuracy']:.3f} "
            f"(evaluator CNN held-out accuracy {reference['classifier_test_accuracy']:.3f})\n"
            f"{'cached' if reference['cached'] else 'pretrained'} in {payload['seconds']:.1f} s"
            + (f" (built in {reference['pretrain_seconds']:.0f} s)" if reference["cached"] else "")
        )
    _emit(payload, json_output, human)


@app.command()
def train(
    objective: Annotated[
        RewardName,
        typer.Option("--objective", "-o", help="The reward to train for (training/rewards.py)."),
    ],
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
    mlflow: Annotated[
        bool, typer.Option(help="Log the run to MLflow and register the model version.")
    ] = True,
) -> None:
    """Train one single-objective LoRA base model with the step-level trainer, log and register it."""
    from flows.jobs import train_job
    from training.storage import msdda_home

    cfg, _ = _config(config, overrides, device)
    result = train_job(
        cfg,
        msdda_home(),
        objective,
        register=mlflow,
        mlflow=mlflow,
        progress=sys.stderr.isatty() or not json_output,
    )
    registered = result["registered"]
    human = (
        f"base model '{objective}': {result['path']}\n"
        f"reward {result['reward_before']:.4f} -> {result['reward_after']:.4f} "
        f"({result['rise_in_se']:+.1f} SE, SE {result['reward_se']:.4f}); KL/step {result['kl']:.4f}; "
        f"{result['unet_evaluations']} UNet evaluations; {result['seconds']:.0f} s"
        + (" (cached)" if result["cached"] else "")
        + _kernel_line(result)
        + (
            f"\nregistered {registered['name']} v{registered['version']}"
            + (" @champion" if registered["champion"] else _not_champion(registered))
            if registered
            else ""
        )
    )
    _emit(result, json_output, human)


WeightsOption = Annotated[str, typer.Option("--weights", "-w", help="Objective weights, e.g. 0.3,0.7.")]
ModelsOption = Annotated[
    str | None,
    typer.Option(
        "--models",
        "-m",
        help="Comma-separated NAME\\[@ALIAS] or NAME/VERSION registry specs, or "
        "base-model folders (default: the config's objectives @champion).",
    ),
]
MethodOption = Annotated[
    MethodName, typer.Option("--method", help="The composition method (`msdda methods` describes them).")
]


def _split(text: str | None, option: str) -> list[str] | None:
    """The comma-separated names of ``option``; ``None`` when it was not given."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError(f"{option} names nothing: give comma-separated names, or leave it out")
    return names


@app.command()
def compose(
    weights: WeightsOption,
    models: ModelsOption = None,
    num_images: Annotated[
        int | None,
        typer.Option(
            "--num-images",
            "-n",
            min=1,
            max=MAX_IMAGES,
            help=f"Images, at most {MAX_IMAGES} (default: composition.num_images).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the initial noise (default: composition.seed).")
    ] = None,
    method: MethodOption = DEFAULT_METHOD,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            "-p",
            metavar="TEXT",
            help=f"A prompt (repeatable; at most {MAX_PROMPT_CHARS:,} characters; text encoders read at most "
            "77 tokens); the images cycle through the prompts (default: the config's evaluation prompts).",
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file",
            help=f"A text file of prompts, one per line (blank lines skipped; at most {MAX_PROMPT_CHARS:,} "
            "characters each).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Image folder (default: under $MSDDA_HOME).")
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Compose registered base models at denoising time for one weight vector; save and score the images."""
    from flows.jobs import compose_job, read_prompts
    from training.storage import msdda_home

    prompts = [*(prompt or []), *(read_prompts(prompts_file) if prompts_file else [])] or None
    cfg, _ = _config(config, overrides, device)
    result = compose_job(
        cfg,
        msdda_home(),
        weights,
        specs=_split(models, "--models"),
        method=method,
        num_images=num_images,
        seed=seed,
        out_dir=out,
        prompts=prompts,
        progress=sys.stderr.isatty() or not json_output,
    )
    lines = [
        (
            f"{result['method']} w={result['weights']}: {result['num_images']} images, "
            f"{result['nfe']:g} UNet rows and {result['reward_calls']:g} reward calls per image, "
            f"{result['seconds']:.1f} s"
        )
    ]
    lines += [f"  {k}: {v:.4f} +- {result['reward_se'][k]:.4f}" for k, v in result["rewards"].items()]
    lines += [f"images: {result['image_dir']}", f"MLflow run: {result['mlflow_run_id']}"]
    _emit(result, json_output, "\n".join(lines))


@app.command()
def sweep(
    methods: Annotated[
        str | None, typer.Option("--methods", help="Comma-separated methods (`msdda methods`); default: all.")
    ] = None,
    grid: Annotated[
        int | None, typer.Option("--grid", min=2, help="Points per simplex edge (11: w=0,0.1..1).")
    ] = None,
    num_images: Annotated[
        int | None,
        typer.Option(
            "--num-images",
            "-n",
            min=2,
            max=MAX_IMAGES,
            help=f"Images per method and weight, at most {MAX_IMAGES} (default: composition.num_images).",
        ),
    ] = None,
    models: ModelsOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Every method over a weight grid: rewards, NFE, Pareto fronts, hypervolume, plots (logged to MLflow)."""
    from flows.jobs import sweep_job
    from training.storage import msdda_home

    cfg, _ = _config(config, overrides, device)
    result = sweep_job(
        cfg,
        msdda_home(),
        specs=_split(models, "--models"),
        methods=_split(methods, "--methods"),
        grid=grid,
        num_images=num_images,
        progress=sys.stderr.isatty() or not json_output,
    )
    _emit(result, json_output, sweep_table(result) + f"\nPareto plot: {result['plot']}")


@app.command()
def methods(json_output: JsonOption = False) -> None:
    """The registered composition methods (`composition/methods.py`): name, label, kind, what a step does."""
    from composition.methods import method_rows, methods_table

    _emit(method_rows(), json_output, methods_table())


def sweep_table(result: dict) -> str:
    """A plain-text summary: hypervolume and NFE per method, and the reference model's rewards."""
    from rich.console import Console
    from rich.table import Table

    objectives = result["objectives"]
    settings = result["settings"]
    table = Table(
        title=f"sweep over {settings['grid']} weights, {settings['num_images']} images each"
        + (" (cached)" if result.get("cached") else "")
    )
    table.add_column("method")
    table.add_column("hypervolume", justify="right")
    table.add_column("max NFE/image", justify="right")
    for name in objectives:
        table.add_column(f"best {name}", justify="right")
    for method, data in result["methods"].items():
        best = [max(p["rewards"][name] for p in data["points"]) for name in objectives]
        table.add_row(
            method, f"{data['hypervolume']:.4g}", f"{data['max_nfe']:g}", *[f"{b:.4f}" for b in best]
        )
    reference = result["reference"]["rewards"]
    table.add_row(
        "reference", "0", f"{result['reference']['nfe']:g}", *[f"{reference[n]:.4f}" for n in objectives]
    )
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(table)
    return buffer.getvalue().rstrip()


def _kernel_line(result: dict) -> str:
    """The kernel check's line of ``msdda train`` (docs/design.md §5.10)."""
    check = result.get("kernel_check", "off")
    if check in ("exact", "monte_carlo"):
        return (
            f"\nkernel check ({check}): error {result['kernel_error']:.3f}, "
            f"cosine {result['kernel_cosine']:.3f} at iteration {result['kernel_check_iteration']} "
            "(the weights kept)"
        )
    return "" if check == "off" else f"\nkernel check {check}"


def _not_champion(registered: dict) -> str:
    reason = registered.get("champion_reason")
    return f" (not champion: {reason})" if reason else " (not champion)"


@app.command()
def models(json_output: JsonOption = False) -> None:
    """List the registered base models: name, version, aliases, objective, reward, kernel error, beta,
    reference hash, and why each did or did not take ``champion``."""
    from flows.registry import list_models
    from training.storage import msdda_home

    rows = list_models(msdda_home())
    if json_output:
        typer.echo(json.dumps({"models": rows}))
        return
    if not rows:
        typer.echo("no registered base models (train some with `msdda train` or `msdda run`)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    columns = ("name", "version", "aliases", "objective", "reward", "rise (SE)", "kernel error", "beta")
    for column in (*columns, "reference", "champion because"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            str(row["version"]),
            ",".join(row["aliases"]),
            row["objective"],
            f"{row['reward_after']:.4f}",
            f"{row['rise_in_se']:.1f}",
            "-" if row["kernel_error"] is None else f"{row['kernel_error']:.3f}",
            f"{row['beta']:g}",
            str(row["reference_hash"])[:12],
            row["champion_reason"],
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@app.command()
def run(
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
    runner: Annotated[
        Runner,
        typer.Option(
            help="How the base models are trained: one after the other, in parallel on Dask, or auto (in "
            "parallel when two or more need training and the CPU has two or more idle cores)."
        ),
    ] = "auto",
) -> None:
    """The main job (Prefect flow `msdda-pipeline`): pretrain the reference, train and register a base model
    per objective, sweep every method over the weight grid, print the summary and the Pareto plot's path.
    Every stage is cached."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.failures import console_without_tracebacks
    from flows.pipeline import pipeline
    from flows.prefect_api import ensure_api
    from flows.registry import check_reachable
    from training.reference.loader import check_reference
    from training.rewards import load_reward
    from training.storage import msdda_home

    cfg, overrides = _config(config, overrides, device)
    home = msdda_home()
    check_reference(cfg)  # a missing checkpoint fails here, in one line, loading nothing
    if not cfg.objectives:
        raise UsageError("the config lists no objectives: nothing to train or compose")
    check_reachable(home)
    # the Prefect API before the reference and the rewards (a whole checkpoint to load; a reward may train its
    # classifier for minutes): a server that is down, or one that does not start, costs seconds
    api_url = ensure_api()
    check_reference(cfg, load=True)  # a checkpoint that does not load fails here, in one line
    for spec in cfg.objectives:  # unknown objectives or missing weights fail before the flow starts
        load_reward(spec.name, cfg, home, spec.options)
    console_without_tracebacks()  # Prefect's console too: a failure is one line (flows.failures)
    # every Prefect client of the flow, Dask workers included, talks to that one server
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        result = pipeline(
            config_path=str(config) if config else None, home=str(home), runner=runner, overrides=overrides
        )
    reference = result["reference"]
    accuracy = reference.get("alignment_accuracy")
    lines = [
        f"reference model: {reference['path']}"
        + (f" (alignment accuracy {accuracy:.3f})" if accuracy is not None else "")
    ]
    for name, m in result["base_models"].items():
        registered = m.get("registered") or {}
        lines.append(
            f"base model {name}: reward {m['reward_before']:.4f} -> {m['reward_after']:.4f} "
            f"({m['rise_in_se']:+.1f} SE), KL/step {m['kl']:.4f}; "
            f"registered {registered.get('name')} v{registered.get('version')}"
            + (" @champion" if registered.get("champion") else "")
        )
    lines += [
        sweep_table(result["sweep"]),
        f"Pareto plot: {result['sweep']['plot']}",
        f"done in {result['seconds']:.0f} s",
    ]
    _emit(result, json_output, "\n".join(lines))


@app.command()
def deploy(
    cron: Annotated[
        str, typer.Option("--cron", help="Training schedule: a cron expression, in UTC.")
    ] = DEFAULT_CRON,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            help="Create the deployments on this process work pool (created if absent) "
            "and exit; then run `prefect worker start --pool NAME`. Default: serve "
            "them here.",
        ),
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create the Prefect deployments on a Prefect server (PREFECT_API_URL):
    `train-base-models/scheduled-training` on a cron schedule and `compose/on-demand`. Without --pool, serve
    them here until Ctrl-C."""
    from flows.deploy import COMPOSE_DEPLOYMENT, check_cron, deploy_to_pool, serve_deployments
    from training.storage import msdda_home

    home = msdda_home()
    check_cron(cron)
    _, overrides = _config(config, overrides, device)  # bad input fails now, not at the first scheduled run
    if pool is not None:
        rows = deploy_to_pool(pool, cron=cron, config_path=config, home=home, overrides=overrides)
        lines = [
            f"deployed {r['name']} ({r['id']})" + (f", cron '{cron}' UTC" if r["schedules"] else "")
            for r in rows
        ]
        lines += [
            f"work pool '{pool}': start a worker with `prefect worker start --pool {pool}`",
            f"compose on demand: prefect deployment run {COMPOSE_DEPLOYMENT} -p 'weights=[0.5, 0.5]'",
        ]
        _emit({"deployments": rows, "work_pool": pool, "serving": False}, json_output, "\n".join(lines))
        return

    def ready(rows: list[dict]) -> None:
        if json_output:
            typer.echo(json.dumps({"deployments": rows, "work_pool": None, "serving": True}))
            sys.stdout.flush()
        for row in rows:
            typer.echo(
                f"deployment {row['name']} ({row['id']})"
                + (f", cron '{cron}' UTC" if row["schedules"] else ""),
                err=True,
            )
        typer.echo("serving; Ctrl-C to stop", err=True)

    serve_deployments(cron, config_path=config, home=home, on_ready=ready, overrides=overrides)


@app.command()
def ui(
    port: Annotated[
        int, typer.Option("--port", "-p", min=1, max=65535, help="Port of the MLflow UI.")
    ] = DEFAULT_PORT,
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind (default: this machine only).")
    ] = DEFAULT_HOST,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the MLflow server's own log.")] = False,
    json_output: JsonOption = False,
) -> None:
    """The MLflow UI (runs, metrics, plots, the model registry) on the configured store, until Ctrl-C; and how
    to open the Prefect UI."""
    from flows.ui import serve_ui
    from training.storage import msdda_home

    def ready(info) -> None:
        if json_output:
            typer.echo(json.dumps(info.as_dict()))
        else:
            started = "MLflow UI" if info.started else "MLflow tracking server (it serves its own UI)"
            lines = [f"{started}: {info.url}  (store: {info.store})"]
            lines += [
                f"  registered model {m['name']}: {m['url']}  (versions {', '.join(map(str, m['versions']))}"
                + (f"; champion v{m['champion']})" if m["champion"] is not None else "; no champion)")
                for m in info.models
            ] or ["  no registered models yet (`msdda train` or `msdda run` registers them)"]
            from flows.ui import prefect_hint

            lines.append(prefect_hint())
            typer.echo("\n".join(lines))
        sys.stdout.flush()
        if info.started:
            typer.echo("Ctrl-C to stop", err=True)

    if serve_ui(msdda_home(), host, port, on_ready=ready, verbose=verbose).started:
        typer.echo("stopped the MLflow UI", err=True)


def _global_verbose(args: list[str]) -> bool:
    """Whether ``--verbose`` stands among the options before the command (``msdda --verbose run``)."""
    for arg in args:
        if not arg.startswith("-"):
            return False
        if arg == "--verbose":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Bad input (:class:`MsddaError`) is one line on stderr and exit code 2; any other
    failure one line and exit code 1, its traceback in a log file; Ctrl-C ``Aborted!`` and exit code 130
    (``flows.failures``)."""
    from flows.failures import command_logging, console_without_tracebacks

    _private_by_default()
    _quiet_upload_bars()
    args = sys.argv[1:] if argv is None else list(argv)
    with command_logging(_global_verbose(args)):
        console_without_tracebacks()
        return _run(args)


def _run(args: list[str]) -> int:
    """The command ``args`` names, its failures reported as :func:`main` says; the exit code.

    The command is parsed and invoked here rather than by typer's ``main``, which would answer Ctrl-C with a
    silent exit 130 and a broken pipe with exit 1: :func:`flows.failures.report_failure` reports both."""
    from flows.failures import report_failure

    command = typer.main.get_command(app)
    try:
        with command.make_context("msdda", list(args) or ["--help"]) as context:  # it consumes the list
            command.invoke(context)
        sys.stdout.flush()  # a reader of stdout that went away fails here, not at the interpreter's exit
    except typer.Exit as exc:  # --help, --version
        return exc.exit_code
    except typer.TyperException as exc:  # a usage error (unknown option, bad choice or value): one line too
        context = getattr(exc, "ctx", None)
        where = f" (see '{context.command_path} --help')" if context is not None else ""
        message = " ".join(exc.format_message().split()).replace("Value error, ", "")
        typer.echo(f"error: {message}{where}", err=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return report_failure(KeyboardInterrupt(), args)
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, the traceback in a log file
        return report_failure(exc, args, verbose=_global_verbose(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
