"""trl 0.23.1's DDPO runs offline on the embedded pipeline and reports reward against UNet evaluations."""

import pytest

from training.ddpo_baseline import run_ddpo
from training.rewards import load_reward

pytest.importorskip("trl")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddpo_runs_and_counts_unet_rows(tiny_config, tiny_home, tiny_reference, tmp_path, guidance):
    config = tiny_config.model_copy(
        update={"sampling": tiny_config.sampling.model_copy(update={"guidance_scale": guidance})}
    )
    reward = load_reward("ink_economy", config, tiny_home)
    history = run_ddpo(config, tiny_reference.path, reward, ["a handwritten digit seven"], epochs=2,
                       out_dir=tmp_path, sample_batch_size=4, train_batch_size=2)
    rows_per_pass = 4 * config.sampling.num_inference_steps * (2 if guidance > 1 else 1)
    # epoch 0's reward is logged after its sampling pass; epoch 1's after one more sampling + one training pass
    assert history.unet_evaluations == [rows_per_pass, 3 * rows_per_pass]
    assert len(history.reward_mean) == 2 and all(r <= 0 for r in history.reward_mean)
