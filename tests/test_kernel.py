"""The step kernel, the chain runner and the policy: DDIM maths, log-probs, KL, variance offsets, devices,
UNet and MLP models alike."""

import pytest
import torch

from training.analysis.toy import MixtureEpsilon, make_scheduler
from training.step.chain import run_chain
from training.step.kernel import DDIMSchedule, GaussianStep, LogVarianceOffset, gaussian_kl, gaussian_log_prob
from training.step.policy import GaussianStepPolicy


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
        kernel = policy(x, step, None)
        eps = eps_model(x, t.expand(16))
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(kernel.mean + kernel.std * noise, expected, rtol=1e-4, atol=1e-5)
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
    kernel_p, kernel_q = GaussianStep(mean_p, var_p), GaussianStep(mean_q, var_q)
    torch.testing.assert_close(kernel_p.log_prob(x), p.log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(
        kernel_p.kl(kernel_q), torch.distributions.kl_divergence(p, q).flatten(1).sum(1)
    )
    assert torch.allclose(kernel_p.kl(kernel_p), torch.zeros(4), atol=1e-6)


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
    assert torch.allclose(policy(x, 2, None).variance, schedule.sigma[2] ** 2 * torch.exp(torch.tensor(0.5)))
    assert torch.allclose(schedule.variance(2, x), schedule.sigma[2] ** 2), "no offset: the DDIM variance"
    policy = GaussianStepPolicy(lambda x, t, c: torch.zeros_like(x), schedule, per_channel)
    var = policy(x, 2, None).variance
    assert var.shape == (1, 4, 1, 1)
    torch.testing.assert_close(
        var.flatten(), schedule.sigma[2] ** 2 * torch.tensor([0.0, 0.1, 0.2, 0.3]).exp()
    )


def test_eta_zero_is_rejected():
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDIMSchedule.from_scheduler(make_scheduler(), 10, 0.0)


def test_unet_policy_with_classifier_free_guidance(tiny_reference):
    from training.reference.embedded import load_embedded_pipeline
    from training.sd_problem import encode_prompts
    from training.step.policy import GuidedEpsilon

    pipe = load_embedded_pipeline(tiny_reference.path)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, 4, 1.0)
    embeds, uncond = encode_prompts(pipe, ["a handwritten digit seven", "handwritten two"])
    cond = {"embeds": embeds, "uncond": uncond.expand(2, -1, -1)}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guided, plain = GuidedEpsilon(pipe.unet, 3.0), GuidedEpsilon(pipe.unet, 1.0)
    with torch.no_grad():
        kernel_g = GaussianStepPolicy(guided, schedule, None)(x, 0, cond)
        mean_g, var_g = kernel_g.mean, kernel_g.variance
        mean_p = GaussianStepPolicy(plain, schedule, None)(x, 0, cond).mean
    assert mean_g.shape == x.shape and var_g.shape == (1, 1, 1, 1)
    assert not torch.allclose(mean_g, mean_p)
    assert guided.rows == 4 and plain.rows == 2, "CFG doubles the UNet rows"


def test_samples_follow_the_kernel_and_draw_the_noise_in_one_place():
    g = torch.Generator().manual_seed(2)
    kernel = GaussianStep(torch.full((2, 3), 1.5), torch.tensor([[4.0]]))
    draws = kernel.sample(g, num=20000)
    assert draws.shape == (20000, 2, 3)
    assert draws.mean().item() == pytest.approx(1.5, abs=0.03) and draws.std().item() == pytest.approx(
        2.0, abs=0.03
    )
    one = kernel.sample(torch.Generator().manual_seed(7))
    noise = torch.randn((2, 3), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(one, 1.5 + 2.0 * noise)


def test_kernel_maths_stays_on_the_device_of_its_inputs():
    """The schedule's tensors live on the CPU; every kernel built from inputs elsewhere lives there too."""
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 5, 1.0)
    x = torch.zeros(3, 4, 8, 8, device="meta")
    offset = torch.zeros(5, 4)
    kernel = schedule.kernel(x, torch.zeros_like(x), 2, offset)
    assert kernel.mean.device.type == "meta" and kernel.variance.device.type == "meta"
    assert kernel.sample(torch.Generator().manual_seed(0)).device.type == "meta"
    assert schedule.timestep(2, x).device.type == "meta"
    assert schedule.clean_estimate(x, x, 2, after=True).device.type == "meta"


def test_chain_runner_keeps_states_and_records_diagnostics():
    scheduler = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, 6, 1.0)
    policy = GaussianStepPolicy(MixtureEpsilon(scheduler.alphas_cumprod), schedule, None)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))

    def kernel(x, step):
        return policy(x, step, None)

    full = run_chain(schedule, x_T, kernel, torch.Generator().manual_seed(1), keep=[0, 3, 6])
    assert set(full.states) == {0, 3, 6}
    torch.testing.assert_close(full.states[0], x_T)
    torch.testing.assert_close(full.states[6], full.latents)
    assert [d["step"] for d in full.diagnostics] == list(range(6))
    assert all(d["std_over_sigma"] == pytest.approx(1.0) for d in full.diagnostics)
    # The chain in two pieces, with the same generator, is the same chain.
    g = torch.Generator().manual_seed(1)
    first = run_chain(schedule, x_T, kernel, g, stop=3, diagnose=False)
    second = run_chain(schedule, first.latents, kernel, g, start=3)
    torch.testing.assert_close(first.latents, full.states[3])
    torch.testing.assert_close(second.latents, full.latents)
    assert first.diagnostics == [] and len(second.diagnostics) == 3


def test_antithetic_draws_come_in_mirrored_pairs():
    step = GaussianStep(torch.randn(3, 4), torch.full((3, 4), 0.25))
    draws = step.sample(torch.Generator().manual_seed(0), num=6, antithetic=True)
    assert draws.shape == (6, 3, 4)
    torch.testing.assert_close(draws.mean(0), step.mean)  # the noises cancel exactly
    torch.testing.assert_close(draws[0] - step.mean, step.mean - draws[1])
    with pytest.raises(ValueError, match="even"):
        step.sample(None, num=5, antithetic=True)


def test_chain_sums_the_analytic_path_kl_from_a_reference():
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 4, 1.0)
    shift = torch.tensor([0.3, -0.1])

    def reference(x, step):
        return GaussianStep(x * 0.9, schedule.variance(step, x).expand_as(x))

    def shifted(x, step):
        ref = reference(x, step)
        return GaussianStep(ref.mean + shift, ref.variance)

    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    same = run_chain(schedule, x_T, reference, torch.Generator().manual_seed(1), reference=reference)
    torch.testing.assert_close(same.kl, torch.zeros(3))
    moved = run_chain(schedule, x_T, shifted, torch.Generator().manual_seed(1), reference=reference)
    expected = sum(float((shift**2).sum() / (2 * schedule.variance(s, x_T))) for s in range(4))
    torch.testing.assert_close(moved.kl, torch.full((3,), expected))
    assert run_chain(schedule, x_T, reference, None).kl is None
