"""Shared fixtures: offline hub, per-test MSDDA_HOME, and a very small embedded model built in seconds."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.helpers import REPO, make_card, random_lora, run_msdda

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CONFIG = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
"""``configs/tiny.yaml``: a very small embedded model, pretrained in seconds."""


def pytest_configure(config):
    """A test runner started in the background (``make test &`` in a script, ``nohup``) ignores SIGINT, and
    the commands it starts inherit that: the Ctrl-C tests would wait for a signal that never arrives. The
    commands started from here get the default again."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Nothing a test does lands in the repo or the user's home."""
    monkeypatch.setenv("MSDDA_HOME", str(tmp_path / "msdda_home"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_settings():
    """``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI`` and ``flows.tracking`` sets MLflow's
    defaults in the environment: without this, an in-process run would send every later test's runs to its
    store and keep its settings."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for name in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
        del os.environ[name]
    os.environ.update(before)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A command run in-process sets torch's thread count (``training.device.configure_threads``): later tests
    keep torch's own, which the golden tests' rounding assumes."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """accelerate keeps process-wide singletons; each test starts from a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store, built once: each test copies it instead of migrating again."""
    home = tmp_path_factory.mktemp("template_home")
    from flows.registry import _client

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        _client(home)
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return home / "mlflow.db"


@pytest.fixture
def store_home(template_db, monkeypatch) -> Path:
    """This test's MSDDA_HOME holding an empty, migrated SQLite store (the default store)."""
    from training.storage import msdda_home

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = msdda_home()
    home.mkdir(parents=True)
    shutil.copy(template_db, home / "mlflow.db")
    return home


@pytest.fixture
def tiny_registry(tmp_path, template_db, tiny_home, tiny_base_models, tiny_config_file, monkeypatch) -> dict:
    """The tiny base models registered as champions in a fresh SQLite store (``MLFLOW_TRACKING_URI``; the
    reference comes from the session's tiny home): ``{"uri", "versions", "home", "config"}``."""
    from tests.helpers import register_champions

    shutil.copy(template_db, tmp_path / "mlflow.db")  # migrating a new store takes seconds
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    versions = register_champions(tiny_home, tiny_base_models)
    return {"uri": uri, "versions": versions, "home": tiny_home, "config": tiny_config_file}


@pytest.fixture(scope="session")
def tiny_config():
    from configs import parse_config

    return parse_config(TINY_CONFIG, "tests/conftest.py")


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_home")


@pytest.fixture(scope="session")
def tiny_reference(tiny_config, tiny_home):
    """The very small embedded reference, pretrained once per session."""
    from training.reference.embedded import pretrain_reference

    return pretrain_reference(tiny_config, tiny_home, progress=False)


@pytest.fixture
def pretrained_home(tmp_path, tiny_home, tiny_reference) -> Path:
    """This test's ``MSDDA_HOME``, holding a copy of the session's pretrained tiny reference and its
    evaluator CNN: a test that runs `msdda train` or `msdda run` (the tiny config) starts from them instead
    of pretraining again, and nothing it writes lands in the shared tiny home."""
    home = Path(os.environ["MSDDA_HOME"])  # set per test by _isolated_home
    copy_pretrained(tiny_home, home)
    return home


def copy_pretrained(tiny_home: Path, home: Path) -> Path:
    """Copy the session's pretrained tiny reference and evaluator CNN into ``home`` (another fresh home)."""
    for part in ("reference", "classifiers"):
        shutil.copytree(tiny_home / part, home / part)
    return home


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_home, tiny_reference) -> SimpleNamespace:
    """`msdda run --config tiny.yaml --json`, once per session, as on a user's machine (a subprocess without
    CI markers or our telemetry settings), in a home that starts with the session's pretrained reference: it
    trains and registers both tiny base models and sweeps. ``root`` (the command's folder: ``home``,
    ``config`` and its ``prefect_home`` lie in it) and ``result`` (the finished process). A test may run
    more commands in ``home`` only if they are cached `msdda run`s (or add only what such runs tolerate)."""
    from flows.cli import PRIVATE_DEFAULTS

    root = tmp_path_factory.mktemp("tiny_run")
    home = copy_pretrained(tiny_home, root / "msdda_home")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    scrub = {"CI", "GITHUB_ACTIONS", "GITLAB_CI", *PRIVATE_DEFAULTS}
    result = run_msdda(["run", "--config", str(config), "--json"], root, home, without=scrub)
    return SimpleNamespace(root=root, home=home, config=config, prefect_home=root / "prefect", result=result)


@pytest.fixture
def trained_home(pretrained_home, tiny_run) -> Path:
    """``pretrained_home`` with copies of the two tiny base models that ``tiny_run`` trained (and no tracking
    store): `msdda train` or `run`, or a benchmark, on the tiny config finds them cached instead of training
    them again. For tests whose subject is not the training."""
    assert tiny_run.result.returncode == 0, tiny_run.result.stderr[-3000:]
    shutil.copytree(tiny_run.home / "base_models", pretrained_home / "base_models")
    return pretrained_home


def own_forward(unet, name: str | None, x, t, context):
    """``unet``'s output with adapter ``name`` alone active (``None``: the reference, adapters disabled),
    through peft's own LoRA forward; every adapter is enabled again afterwards."""
    if name is None:
        unet.disable_adapters()
    else:
        unet.set_adapters(name)
    try:
        return unet(x, t, encoder_hidden_states=context).sample
    finally:
        unet.enable_adapters()


@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_base_models(tiny_config, tiny_home, tiny_reference):
    """Two base models (random LoRA weights and variance offsets) in the saved format, on the tiny
    reference."""
    import torch
    from peft import get_peft_model_state_dict

    from training.base_model import evaluation_problem
    from training.card import LORA_TARGETS, LoraSpec, RewardSpec, save_base_model
    from training.storage import content_hash

    problem = evaluation_problem(tiny_config, tiny_home, None)
    keys = {k: v.shape for k, v in get_peft_model_state_dict(problem.unet, adapter_name="default").items()}
    scheduler = dict(problem.pipe.scheduler.config)
    folders = []
    for i, objective in enumerate(tiny_config.objective_names):
        lora = random_lora(keys, seed=i, scale=0.2)
        log_variance = torch.full((tiny_config.sampling.num_inference_steps, 1), 0.3 * (i - 0.5))
        card = make_card(  # only what training writes: no train settings, reference details or history
            objective,
            reward=RewardSpec(name=objective),
            beta=0.01,
            trainer="target_matching",
            lora=LoraSpec(rank=4, targets=LORA_TARGETS),
            learn_variance="step",
            reference_hash=content_hash(tiny_reference.path),
            scheduler=scheduler,
            sampling=tiny_config.sampling.model_dump(mode="json"),
            metrics={
                "reward_before": -1.0,
                "reward_after": -0.5 - i,
                "reward_se": 0.1,
                "rise_in_se": 5.0,
                "kl": 0.01,
            },
            train={},
            reference={},
            history=[],
        )
        folders.append(save_base_model(tiny_home / "fake_base_models" / objective, card, lora, log_variance))
    return folders


@pytest.fixture(scope="module")
def unet_with_two_adapters(tiny_reference):
    """The tiny reference UNet carrying two random rank-4 LoRA adapters, ``alpha`` and ``beta``."""
    from peft import LoraConfig, get_peft_model_state_dict

    from composition.batched import load_adapter
    from training.card import LORA_TARGETS, LoraSpec
    from training.reference.embedded import load_embedded_pipeline

    unet = load_embedded_pipeline(tiny_reference.path).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name="probe")
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet, adapter_name="probe").items()}
    unet.delete_adapters("probe")
    for i, name in enumerate(["alpha", "beta"]):
        lora = random_lora(shapes, seed=i, scale=0.1)
        load_adapter(unet, name, lora, LoraSpec(rank=4, targets=LORA_TARGETS))
    return unet.eval()


@pytest.fixture(scope="module")
def tiny_pipe(tiny_reference, tiny_base_models):
    """``MSDDAPipeline`` on the tiny reference with both tiny base models loaded, one per test module (tests
    that change it put it back)."""
    from composition.pipeline import MSDDAPipeline

    pipe = MSDDAPipeline.from_pretrained(tiny_reference.path)
    for folder in tiny_base_models:
        pipe.load_base_model(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """A throwaway Prefect API (temporary SQLite database) with PREFECT_HOME in tmp."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect_home")}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield
