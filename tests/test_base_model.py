"""Training a LoRA base model on the tiny embedded reference, its saved format, and the `msdda train` CLI."""

import json

import pytest
import torch

from training.base_model import evaluation_problem, train_base_model, untrained
from training.card import CARD_FILE, LORA_FILE, LORA_TARGETS, VARIANCE_FILE, BaseModelCard, load_base_model
from training.storage import content_hash

TINY_TRAIN = {
    "iterations": 2,
    "batch_size": 4,
    "states_per_trajectory": 2,
    "num_actions": 2,
    "eval_samples": 8,
    "checkpoint_every": 1,
    "learning_rate": 0.01,
}


@pytest.fixture(scope="module")
def trained(tiny_config, tiny_home, tiny_reference):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update=TINY_TRAIN)})
    return config, train_base_model(config, "ink_economy", tiny_home, progress=False)


def test_base_model_is_saved_with_its_lineage(trained, tiny_reference):
    _, result = trained
    assert not result.cached
    assert {p.name for p in result.path.iterdir()} == {LORA_FILE, VARIANCE_FILE, CARD_FILE}
    card = BaseModelCard.read(result.path)
    assert card.objective == "ink_economy" and card.beta == 0.01 and card.trainer == "target_matching"
    assert card.format_version == 2 and card.lora.rank == 4 and card.lora.targets == LORA_TARGETS
    assert card.reference_hash == content_hash(tiny_reference.path)
    assert card.scheduler["_class_name"] == "DDIMScheduler"
    assert card.reward.differentiable is True
    assert len(card.history) == 2 and card.history[-1]["unet_evaluations"] > 0
    assert all(0.5 <= h["ess_share"] <= 1 and h["reward_spread"] >= 0 for h in card.history)
    assert card.metrics["reward_after"] == result.reward_after
    # eval_every 20 > 2 iterations: the kernel check runs after the last one (Monte Carlo: not a quadratic)
    assert card.metrics["kernel_check"] == "monte_carlo" and card.metrics["kernel_check_iteration"] == 2
    assert card.history[-1]["kernel_error"] == card.metrics["kernel_error"] > 0
    model = load_base_model(result.path)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.lora.items()), "LoRA moved off zero"
    assert model.log_variance.shape == (4, 1)
    assert not list(result.path.parent.glob(".build-*")), "no temporary folders left behind"


def test_evaluation_problem_loads_the_saved_model(trained, tiny_home):
    config, result = trained
    model = load_base_model(result.path)
    state = evaluation_problem(config, tiny_home, result.path).trainable_state()
    assert state.keys() == {f"lora.{k}" for k in model.lora} | {"log_variance"}
    assert all(torch.equal(state[f"lora.{k}"], v) for k, v in model.lora.items())
    assert torch.equal(state["log_variance"], model.log_variance)


def test_metrics_are_reported(trained):
    _, result = trained
    for key in ("reward_before", "reward_after", "reward_se", "kl", "seconds"):
        assert torch.isfinite(torch.tensor(getattr(result, key)))
    assert result.reward_se > 0 and result.kl >= 0


def test_second_call_reuses_the_model(trained, tiny_home):
    config, result = trained
    again = train_base_model(config, "ink_economy", tiny_home, progress=False)
    assert again.cached and again.path == result.path and again.reward_after == result.reward_after


def test_untrained_lists_the_objectives_without_a_model(trained, tiny_home):
    """What `--runner auto` counts: a trained model is found by its run key, so another setting lists it."""
    config, _ = trained
    assert "ink_economy" not in untrained(config, ["digit_alignment", "ink_economy"], tiny_home)
    other = config.model_copy(update={"train": config.train.model_copy(update={"seed": 987})})
    assert untrained(other, ["digit_alignment", "ink_economy"], tiny_home) == [
        "digit_alignment",
        "ink_economy",
    ]


def test_an_unwritable_model_folder_fails_before_training(trained, pretrained_home, monkeypatch):
    """It used to train in full and only then fail to save (a read-only home with a cached reference)."""
    import training.base_model
    from training.storage import HomeError

    config, _ = trained
    (pretrained_home / "base_models").write_text("a file where the models folder belongs")
    monkeypatch.setattr(training.base_model, "train", lambda *a, **k: pytest.fail("trained before failing"))
    with pytest.raises(HomeError, match=r"cannot write to .*base_models"):
        train_base_model(config, "ink_economy", pretrained_home, progress=False)


def test_cli_unknown_objective_is_one_line(tmp_path, tiny_config_file):
    from tests.helpers import run_msdda

    args = ["train", "--objective", "beauty", "--config", str(tiny_config_file)]
    out = run_msdda(args, tmp_path, tmp_path / "h")
    # the CLI's choices list the registered rewards (training.rewards.REWARDS)
    assert out.returncode == 2 and out.stderr.startswith("error: Invalid value for '--objective'")
    assert "'beauty' is not one of" in out.stderr and "'ink_economy'" in out.stderr
    assert out.stderr.strip().count("\n") == 0 and not (tmp_path / "h").exists()


def test_cli_missing_reward_weights_is_one_line(tmp_path):
    from tests.helpers import run_msdda

    path = tmp_path / "c.yaml"
    path.write_text("objectives:\n  - name: clip_score\n")
    out = run_msdda(["train", "--objective", "clip_score", "--config", str(path)], tmp_path, tmp_path / "h")
    assert out.returncode == 2 and "needs `options.weights`" in out.stderr and "Traceback" not in out.stderr


def test_cli_train_logs_every_iteration_to_mlflow(tmp_path, tiny_config_file, pretrained_home):
    import mlflow

    from tests.helpers import run_msdda

    home = pretrained_home
    args = ["train", "--objective", "ink_economy", "--config", str(tiny_config_file), "--json"]
    out = run_msdda(args, tmp_path, home)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert {"reward_before", "reward_after", "reward_se", "kl", "seconds"} <= payload.keys()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    metrics = (
        "reward_mean",
        "reward_std",
        "kl",
        "loss",
        "unet_evaluations",
        "seconds",
        "ess_share",
        "reward_spread",
    )
    for metric in metrics:
        history = client.get_metric_history(payload["mlflow_run_id"], metric)
        assert [m.step for m in history] == [1, 2], metric
    evaluations = [m.value for m in client.get_metric_history(payload["mlflow_run_id"], "unet_evaluations")]
    assert evaluations[1] > evaluations[0] > 0
    ess = [m.value for m in client.get_metric_history(payload["mlflow_run_id"], "ess_share")]
    assert all(1 / 2 <= value <= 1 for value in ess)  # N = 2 actions (tiny.yaml): one action .. both
    for metric in ("kernel_error", "kernel_cosine"):  # logged at the iterations checked: the last one here
        history = client.get_metric_history(payload["mlflow_run_id"], metric)
        assert [m.step for m in history] == [2] and history[0].value == payload[metric], metric
    registered = payload["registered"]
    version = client.get_model_version(registered["name"], str(registered["version"]))
    assert f"kernel error {payload['kernel_error']:.3f}" in version.description
    assert version.tags["champion_reason"] in version.description
