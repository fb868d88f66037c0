"""The Gaussian step policy: DDIM maths, log-probs, KL, variance offsets, UNet and MLP models alike."""

import pytest
import torch

from training.policy import (
    DDIMSchedule,
    GaussianStepPolicy,
    LogVarianceOffset,
    gaussian_kl,
    gaussian_log_prob,
)
from training.toy import MixtureEpsilon, make_scheduler


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_matches_diffusers_ddim(eta):
    scheduler = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, 10, eta)
    eps_model = MixtureEpsilon(scheduler.alphas_cumprod)
    policy = GaussianStepPolicy(eps_model, schedule, None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g)
    for step, t in enumerate(scheduler.timesteps):
        noise = torch.randn(16, 2, generator=g)
        mean, var = policy(x, step, None)
        eps = eps_model(x, t.expand(16))
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + var.sqrt() * noise, expected, rtol=1e-4, atol=1e-5)
        x = expected


def test_log_prob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean_p, mean_q = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    var_p, var_q = torch.rand(4, 3, 5, generator=g) + 0.1, torch.rand(4, 3, 5, generator=g) + 0.1
    x = torch.randn(4, 3, 5, generator=g)
    p = torch.distributions.Normal(mean_p, var_p.sqrt())
    q = torch.distributions.Normal(mean_q, var_q.sqrt())
    torch.testing.assert_close(gaussian_log_prob(x, mean_p, var_p), p.log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(
        gaussian_kl(mean_p, var_p, mean_q, var_q), torch.distributions.kl_divergence(p, q).flatten(1).sum(1)
    )


def test_learned_log_variance_scales_sigma():
    scheduler = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, 5, 1.0)
    per_step = LogVarianceOffset(5)
    per_channel = LogVarianceOffset(5, channels=4)
    with torch.no_grad():
        per_step.values[2] = 0.5
        per_channel.values[2] = torch.tensor([0.0, 0.1, 0.2, 0.3])
    x = torch.zeros(3, 4, 8, 8)
    policy = GaussianStepPolicy(lambda x, t, c: torch.zeros_like(x), schedule, per_step)
    assert torch.allclose(policy.variance(2, x), schedule.sigma[2] ** 2 * torch.exp(torch.tensor(0.5)))
    policy = GaussianStepPolicy(lambda x, t, c: torch.zeros_like(x), schedule, per_channel)
    var = policy.variance(2, x)
    assert var.shape == (1, 4, 1, 1)
    torch.testing.assert_close(var.flatten(), schedule.sigma[2] ** 2 * torch.tensor([0.0, 0.1, 0.2, 0.3]).exp())


def test_eta_zero_is_rejected():
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDIMSchedule.from_scheduler(make_scheduler(), 10, 0.0)


def test_unet_policy_with_classifier_free_guidance(tiny_reference):
    from training.embedded import load_embedded_pipeline
    from training.sd_problem import GuidedEpsilon, encode_prompts

    pipe = load_embedded_pipeline(tiny_reference.path)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, 4, 1.0)
    embeds, uncond = encode_prompts(pipe, ["a handwritten digit seven", "handwritten two"])
    cond = {"embeds": embeds, "uncond": uncond.expand(2, -1, -1)}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guided, plain = GuidedEpsilon(pipe.unet, 3.0), GuidedEpsilon(pipe.unet, 1.0)
    with torch.no_grad():
        mean_g, var_g = GaussianStepPolicy(guided, schedule, None)(x, 0, cond)
        mean_p, _ = GaussianStepPolicy(plain, schedule, None)(x, 0, cond)
    assert mean_g.shape == x.shape and var_g.shape == (1, 1, 1, 1)
    assert not torch.allclose(mean_g, mean_p)
    assert guided.rows == 4 and plain.rows == 2, "CFG doubles the UNet rows"
