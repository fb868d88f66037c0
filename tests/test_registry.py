"""The MLflow registry layer against real MLflow on SQLite in temporary folders (no mocks, no training)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flows.registry import (
    MODEL_PREFIX,
    RegistryError,
    ResolvedModel,
    list_models,
    register_base_model,
    registered_name,
    resolve,
)
from tests.helpers import (
    REGISTRY_SCHEDULER as SCHEDULER,
)
from tests.helpers import (
    fake_base_model,
    fake_card,
    fake_weights,
    free_port,
    subprocess_env,
)
from training.card import (
    CARD_FILE,
    LEGACY_LORA_FILE,
    LORA_FILE,
    VARIANCE_FILE,
    CardError,
    check_lineage,
    load_base_model,
)
from training.storage import msdda_home


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


@pytest.fixture
def home(store_home) -> Path:
    return store_home


def test_register_list_and_resolve(home, tmp_path):
    ink = fake_base_model(tmp_path / "ink", "ink_economy", seed=1, rise_in_se=6.0)
    digit = fake_base_model(tmp_path / "digit", "digit_alignment", seed=2, rise_in_se=4.0)
    first = register_base_model(home, ink)
    assert (first["name"], first["version"], first["aliases"], first["created"]) == (
        "msdda-ink_economy",
        1,
        ["champion"],
        True,
    )
    register_base_model(home, digit)

    rows = list_models(home)
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [
        ("msdda-digit_alignment", 1, ["champion"]),
        ("msdda-ink_economy", 1, ["champion"]),
    ]
    ink_row = rows[1]
    assert ink_row["objective"] == "ink_economy" and ink_row["reward_after"] == pytest.approx(0.26)
    assert ink_row["reward_se"] == pytest.approx(0.01) and ink_row["beta"] == 0.1
    assert ink_row["reference_hash"] == "ref-aaaa" and ink_row["run_id"] == first["run_id"]

    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(home), tracking_uri(home))
    tags = client.get_model_version("msdda-ink_economy", "1").tags
    assert client.get_run(first["run_id"]).data.metrics["rise_in_se"] == 6.0
    assert json.loads(tags["scheduler"]) == SCHEDULER and json.loads(tags["reward"])["name"] == "ink_economy"
    assert tags["trainer"] == "step_level" and float(tags["rise_in_se"]) == 6.0 and float(tags["kl"]) == 0.05
    assert len(tags["git_sha"]) == 40 or tags["git_sha"] == "unknown"
    assert json.loads(tags["sampling"])["eta"] == 1.0 and tags["format_version"] == "2"
    assert json.loads(tags["reward_scale"]) == {"offset": 0.0, "scale": 1.0}

    for spec in ("ink_economy", "msdda-ink_economy@champion", "msdda-ink_economy/1", "ink_economy/1"):
        resolved = resolve(home, spec)
        assert resolved == ResolvedModel(
            home / "registry_cache" / "msdda-ink_economy" / "1", "msdda-ink_economy", 1
        )
        assert same_files(resolved.path, ink), spec
    assert same_files(resolve(home, "digit_alignment").path, digit)

    again = register_base_model(home, ink)  # the same files: no duplicate version
    assert (again["version"], again["created"]) == (1, False)
    assert len(list_models(home)) == 2


def test_weak_version_does_not_take_the_champion_alias(home, tmp_path):
    strong = register_base_model(home, fake_base_model(tmp_path / "a", "ink_economy", seed=1, rise_in_se=5.0))
    weak_dir = fake_base_model(tmp_path / "b", "ink_economy", seed=2, rise_in_se=2.5)
    weak = register_base_model(home, weak_dir)
    assert (strong["version"], weak["version"]) == (1, 2)
    assert weak["aliases"] == [] and not weak["champion"]
    assert [(r["version"], r["aliases"]) for r in list_models(home)] == [(1, ["champion"]), (2, [])]
    assert same_files(resolve(home, "ink_economy/2").path, weak_dir)
    assert resolve(home, "ink_economy").version == 1
    forced = register_base_model(
        home, fake_base_model(tmp_path / "c", "ink_economy", seed=3, rise_in_se=1.0), champion=True
    )
    assert forced["version"] == 3 and forced["aliases"] == ["champion"]
    assert [(r["version"], r["aliases"]) for r in list_models(home)] == [(1, []), (2, []), (3, ["champion"])]


def test_unknown_model_alias_or_version_is_a_one_line_error(home, tmp_path):
    register_base_model(home, fake_base_model(tmp_path / "a", "ink_economy", seed=1, rise_in_se=1.0))
    register_base_model(home, fake_base_model(tmp_path / "b", "digit_alignment", seed=2))
    before = list_models(home)
    cases = {
        "no_such_objective": ["'msdda-no_such_objective'", "msdda-digit_alignment", "msdda-ink_economy"],
        "ink_economy": ["no alias 'champion'", "aliases: none", "versions: 1"],  # never became champion
        "digit_alignment@best": ["no alias 'best'", "champion (v1)"],
        "digit_alignment/7": ["no version 7", "versions: 1"],
        "digit_alignment/x": ["invalid model spec"],
        "bad name!": ["invalid model name"],
    }
    for spec, fragments in cases.items():
        with pytest.raises(RegistryError) as info:
            resolve(home, spec)
        message = str(info.value)
        assert "\n" not in message and all(f in message for f in fragments), (spec, message)
    assert list_models(home) == before
    assert not (home / "registry_cache").exists() or not any((home / "registry_cache").rglob("*.safetensors"))


def test_resolved_models_with_mismatched_lineage_are_refused(home, tmp_path):
    register_base_model(home, fake_base_model(tmp_path / "a", "ink_economy", seed=1))
    register_base_model(home, fake_base_model(tmp_path / "b", "digit_alignment", seed=2))
    register_base_model(home, fake_base_model(tmp_path / "c", "other_ref", seed=3, reference_hash="ref-bbbb"))
    other_scheduler = {**SCHEDULER, "beta_schedule": "linear"}
    register_base_model(
        home, fake_base_model(tmp_path / "d", "other_sched", seed=4, scheduler=other_scheduler)
    )
    newer_diffusers = {**SCHEDULER, "_diffusers_version": "0.99.0"}
    register_base_model(
        home, fake_base_model(tmp_path / "e", "same_sched", seed=5, scheduler=newer_diffusers)
    )

    def load(*specs: str) -> list:
        return [load_base_model(resolve(home, spec).path) for spec in specs]

    models = load("ink_economy", "digit_alignment", "same_sched")
    check_lineage(models)
    assert [m.path.parent.name for m in models] == [
        "msdda-ink_economy",
        "msdda-digit_alignment",
        "msdda-same_sched",
    ]
    with pytest.raises(
        CardError,
        match=r"'ink_economy' \(.*\) and 'other_ref' \(.*\).*different reference models "
        r"\(reference_hash ref-aaaa vs ref-bbbb\)",
    ) as info:
        check_lineage(load("ink_economy", "other_ref"))
    assert "\n" not in str(info.value)
    with pytest.raises(
        CardError,
        match=r"'digit_alignment' \(.*\) and 'other_sched' \(.*\).*scheduler configs "
        r"\(differing: beta_schedule\)",
    ):
        check_lineage(load("digit_alignment", "other_sched"))


def test_legacy_format_1_folder_registers_and_loads(home, tmp_path):
    """Folders written before the card (adapter_model.safetensors, no format_version) keep working."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    lora, log_variance = fake_weights(7)
    save_file(lora, folder / LEGACY_LORA_FILE)
    save_file({"log_variance": log_variance}, folder / VARIANCE_FILE)
    meta = fake_card("ink_economy").model_dump(mode="json", exclude={"format_version", "reward_scale"})
    (folder / CARD_FILE).write_text(json.dumps(meta))
    registered = register_base_model(home, folder)
    assert registered["version"] == 1 and registered["champion"]
    resolved = resolve(home, "ink_economy")
    assert same_files(resolved.path, folder)
    model = load_base_model(resolved.path)
    assert model.card.format_version == 1 and all(torch.equal(model.lora[k], v) for k, v in lora.items())


def test_registering_a_folder_without_a_card_is_a_one_line_error(home, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CardError, match=f"{CARD_FILE} is missing") as info:
        register_base_model(home, tmp_path / "empty")
    assert "\n" not in str(info.value)


CONCURRENT_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flows.registry import register_base_model
    home, go, folders = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    while not go.exists():
        time.sleep(0.01)
    for folder in folders:
        register_base_model(home, Path(folder))
""")


def test_concurrent_registration_loses_nothing(tmp_path, monkeypatch):
    """Two processes register into a store that does not exist yet: creating it races too."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = msdda_home()
    folders = [
        fake_base_model(tmp_path / f"m{i}", ("conc_x", "conc_y")[i % 2], seed=10 + i, rise_in_se=float(i))
        for i in range(6)
    ]
    go = tmp_path / "go"
    env = subprocess_env(OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, str(home), str(go), *map(str, chunk)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for chunk in (folders[:3], folders[3:])
    ]
    time.sleep(0.5)
    go.touch()  # both processes are importing or waiting: they register at the same time
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]

    from training.storage import content_hash

    rows = list_models(home)
    by_hash = {r["content_hash"]: r for r in rows}
    assert len(rows) == 6 and len(by_hash) == 6
    assert sorted((r["name"], r["version"]) for r in rows) == [
        (f"{MODEL_PREFIX}conc_{o}", v) for o in "xy" for v in (1, 2, 3)
    ]
    for i, folder in enumerate(folders):
        row = by_hash[content_hash(folder)]
        assert row["objective"] == ("conc_x", "conc_y")[i % 2] and row["rise_in_se"] == float(i)
        assert same_files(resolve(home, f"{row['name']}/{row['version']}").path, folder)


def test_unreachable_tracking_server_fails_fast(home, tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    folder = fake_base_model(tmp_path / "a", "ink_economy", seed=1)
    start = time.perf_counter()
    for call in (
        lambda: list_models(home),
        lambda: resolve(home, "ink_economy"),
        lambda: register_base_model(home, folder),
    ):
        with pytest.raises(
            RegistryError, match=f"MLflow tracking server at http://127.0.0.1:{port} is unreachable"
        ):
            call()
    assert time.perf_counter() - start < 15


def test_corrupt_cache_is_replaced_and_corrupt_artifacts_refused(home, tmp_path):
    folder = fake_base_model(tmp_path / "a", "ink_economy", seed=1)
    registered = register_base_model(home, folder)
    cached = resolve(home, "ink_economy").path
    weights = cached / LORA_FILE
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    assert same_files(resolve(home, "ink_economy").path, folder)

    source = Path(registered["source"].removeprefix("file://"))
    (source / LORA_FILE).write_bytes(b"garbage")
    shutil.rmtree(home / "registry_cache")
    with pytest.raises(RegistryError, match="msdda-ink_economy v1 is corrupt"):
        resolve(home, "ink_economy")
    assert not any((home / "registry_cache").rglob("*.safetensors"))


def test_registered_name():
    assert registered_name("ink_economy") == "msdda-ink_economy"
    assert registered_name("msdda-ink_economy") == "msdda-ink_economy"


def test_register_into_an_existing_training_run(home, tmp_path):
    from flows.tracking import mlflow_run

    with mlflow_run(home, "train-ink_economy") as (run, _):
        run_id = run.info.run_id
    first_dir = fake_base_model(tmp_path / "a", "ink_economy", seed=1)
    second_dir = fake_base_model(tmp_path / "b", "ink_economy", seed=2)
    first = register_base_model(home, first_dir, run_id=run_id)
    second = register_base_model(home, second_dir, run_id=run_id, champion=False)
    assert first["run_id"] == second["run_id"] == run_id
    assert first["source"].endswith("/base_model") and second["source"] != first["source"]
    assert same_files(resolve(home, "ink_economy/1").path, first_dir)
    assert same_files(resolve(home, "ink_economy/2").path, second_dir)
    assert resolve(home, "ink_economy").version == 1


def test_versions_describe_the_metrics_that_earned_the_alias(home, tmp_path):
    strong = register_base_model(home, fake_base_model(tmp_path / "a", "ink_economy", seed=1, rise_in_se=6.0))
    weak = register_base_model(home, fake_base_model(tmp_path / "b", "ink_economy", seed=2, rise_in_se=2.5))
    forced = register_base_model(
        home, fake_base_model(tmp_path / "c", "ink_economy", seed=3, rise_in_se=1.0), champion=True
    )

    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(home), tracking_uri(home))
    text = {
        r["version"]: client.get_model_version("msdda-ink_economy", str(r["version"])).description
        for r in (strong, weak, forced)
    }
    assert text[1] == (
        "ink_economy base model (beta 0.1, step_level): held-out reward 0.2000 -> 0.2600 "
        "(rise +6.0 SE, paired SE 0.01); KL/step 0.0500. champion: the reward rose by more than 3 SE "
        "(no kernel check: train.eval_every was 0)."
    )
    assert "rise +2.5 SE" in text[2] and text[2].endswith(
        "not champion: the reward did not rise by more than 3 SE."
    )
    assert "rise +1.0 SE" in text[3] and text[3].endswith(" champion: set explicitly.")


def test_the_alias_needs_the_kernel_check_too_and_the_listing_says_why(home, tmp_path):
    """With a kernel check on the card, ``champion`` needs its error within ``train.max_kernel_error`` as well
    as the reward's rise; a check that could not run fails it; each version's reason is listed."""
    checked = {"kernel_check": "exact", "kernel_cosine": 0.9, "kernel_check_iteration": 40}
    cases = {
        "within": {**checked, "kernel_error": 0.3},
        "above": {**checked, "kernel_error": 1.4},
        "tighter": {**checked, "kernel_error": 0.3, "max_kernel_error": 0.25},
        "missing": {"kernel_check": "missing: the reward is not finite at a held-out action of step 3"},
    }
    registered = {
        name: register_base_model(home, fake_base_model(tmp_path / name, "ink_economy", seed, 6.0, kernel=k))
        for seed, (name, k) in enumerate(cases.items())
    }
    assert [registered[name]["champion"] for name in cases] == [True, False, False, False]
    reasons = {row["version"]: row["champion_reason"] for row in list_models(home)}
    assert reasons[1] == "the reward rose by more than 3 SE and kernel error 0.300 <= 1 (exact check)"
    assert reasons[2] == "kernel error 1.400 > 1 (exact check)"
    assert reasons[3] == "kernel error 0.300 > 0.25 (exact check)"
    assert reasons[4] == (
        "the kernel check is missing: the reward is not finite at a held-out action of step 3"
    )
    assert resolve(home, "ink_economy").version == 1
    assert [row["kernel_error"] for row in list_models(home)][:3] == [0.3, 1.4, 0.3]
