"""trl 0.23.1's DDPO runs offline on the embedded pipeline and reports reward against UNet evaluations."""

import pytest
import torch

from training.analysis import ddpo_baseline
from training.analysis.ddpo_baseline import run_ddpo
from training.rewards import Reward, load_reward

pytest.importorskip("trl")

PROMPTS = ["a handwritten digit seven"]


def _instrumented_run(monkeypatch, config, home, reference, out_dir, seed=0):
    """``run_ddpo`` with its pipeline and reward observed: what the reward is called on, and the LoRA weights
    right after trl adds the adapter and after training."""
    pipes, calls = [], []
    make_class = ddpo_baseline._pipeline_class

    def recording_class():
        base = make_class()

        class Recording(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                pipes.append(self)

            def get_trainable_layers(self):
                unet = super().get_trainable_layers()
                self.initial = {k: p.detach().clone() for k, p in unet.named_parameters() if p.requires_grad}
                return unet

        return Recording

    monkeypatch.setattr(ddpo_baseline, "_pipeline_class", recording_class)
    inner = load_reward("ink_economy", config, home)

    def fn(images, prompts):
        out = inner(images, prompts)
        calls.append((images.detach().clone(), list(prompts), out.detach().clone()))
        return out

    reward = Reward(inner.name, inner.differentiable, fn)
    history = run_ddpo(
        config,
        reference.path,
        reward,
        PROMPTS,
        epochs=2,
        out_dir=out_dir,
        sample_batch_size=4,
        train_batch_size=2,
        seed=seed,
    )
    (pipe,) = pipes
    final = {k: p.detach().clone() for k, p in pipe.sd_pipeline.unet.named_parameters() if p.requires_grad}
    return history, calls, pipe.initial, final


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddpo_runs_and_counts_unet_rows(
    tiny_config, tiny_home, tiny_reference, tmp_path, monkeypatch, guidance
):
    config = tiny_config.model_copy(
        update={"sampling": tiny_config.sampling.model_copy(update={"guidance_scale": guidance})}
    )
    run = _instrumented_run(monkeypatch, config, tiny_home, tiny_reference, tmp_path)
    history, calls, initial, final = run
    rows_per_pass = 4 * config.sampling.num_inference_steps * (2 if guidance > 1 else 1)
    # epoch 0's reward is logged after its sampling pass; epoch 1's after one more sampling + one training
    # pass
    assert history.unet_evaluations == [rows_per_pass, 3 * rows_per_pass]

    # the reward is computed once per epoch on the sampled images: a batch of real images of the model's size
    size = config.model.embedded.image_size
    assert len(calls) == 2
    for images, prompts, rewards in calls:
        assert images.shape == (4, 3, size, size) and torch.isfinite(images).all()
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
        assert prompts == PROMPTS * 4
        assert rewards.shape == (4,) and torch.isfinite(rewards).all()
    # what is reported is the mean of those rewards, and the second epoch samples other images
    assert history.reward_mean == pytest.approx([c[2].mean().item() for c in calls], rel=1e-6, abs=1e-7)
    assert not torch.equal(calls[0][0], calls[1][0])

    # DDPO trains exactly the LoRA weights; peft's "gaussian" init starts B at zero, the update moves it
    assert initial and all("lora" in k for k in initial) and initial.keys() == final.keys()
    lora_b = [k for k in initial if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(initial[k]) == 0 for k in lora_b)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert sum(torch.count_nonzero(final[k]).item() for k in lora_b) > 0, "the DDPO update changed nothing"


def test_ddpo_is_deterministic_under_a_seed(tiny_config, tiny_home, tiny_reference, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    runs = []
    for attempt in range(2):
        out_dir = tmp_path / str(attempt)
        runs.append(_instrumented_run(monkeypatch, tiny_config, tiny_home, tiny_reference, out_dir))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    (history_a, calls_a, _, final_a), (history_b, calls_b, _, final_b) = runs
    assert history_a.reward_mean == history_b.reward_mean
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calls_a, calls_b, strict=True)), "same samples"
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), "same LoRA weights after training"
