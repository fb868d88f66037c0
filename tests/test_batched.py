"""K LoRA base models in one batched UNet forward give exactly the per-adapter forwards."""

import pytest
import torch

from composition.batched import REFERENCE, load_adapter, mixed_adapter_batch, routing
from training.sd_problem import LORA_TARGETS


def random_lora(unet_state_keys, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(shape, generator=g) for k, shape in unet_state_keys.items()}


@pytest.fixture(scope="module")
def unet_with_two_adapters(tiny_reference):
    from peft import LoraConfig, get_peft_model_state_dict

    from training.embedded import load_embedded_pipeline

    unet = load_embedded_pipeline(tiny_reference.path).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name="probe")
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet, adapter_name="probe").items()}
    unet.delete_adapters("probe")
    for i, name in enumerate(["alpha", "beta"]):
        load_adapter(unet, name, random_lora(shapes, seed=i), rank=4, targets=LORA_TARGETS)
    return unet.eval()


@torch.no_grad()
def test_mixed_batch_equals_separate_forwards(unet_with_two_adapters):
    unet = unet_with_two_adapters
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.full((3,), 500)
    context = torch.randn(3, 16, unet.config.cross_attention_dim, generator=g)

    separate = []
    for name in ["alpha", "beta", None]:
        if name is None:
            unet.disable_adapters()
        else:
            unet.set_adapters(name)
        separate.append(unet(x, t, encoder_hidden_states=context).sample)
        unet.enable_adapters()

    names = routing(["alpha", "beta", REFERENCE], 3)
    with mixed_adapter_batch(unet, names):
        batched = unet(x.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=context.repeat(3, 1, 1)).sample
    for i, expected in enumerate(separate):
        torch.testing.assert_close(batched[3 * i : 3 * (i + 1)], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(separate[0], separate[1]), "the adapters really differ"
    assert not torch.allclose(separate[0], separate[2])


def test_routing_must_divide_the_batch(unet_with_two_adapters):
    unet = unet_with_two_adapters
    with mixed_adapter_batch(unet, ["alpha", "beta"]), pytest.raises(ValueError, match="does not split"):
        unet(torch.zeros(3, 4, 8, 8), torch.full((3,), 10),
             encoder_hidden_states=torch.zeros(3, 16, unet.config.cross_attention_dim))


def _sampler_inputs(unet, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 4, 8, 8, generator=g)
    embeds = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=g)
    uncond = torch.randn(1, 16, unet.config.cross_attention_dim, generator=g).expand(batch, -1, -1)
    return x_T, embeds, uncond


def _single_chain(unet, schedule, adapter, x_T, embeds, log_variance, seed):
    """The base model (or the reference) sampled on its own, step by step, with the same noise."""
    from training.policy import GaussianStepPolicy, LogVarianceOffset
    from training.sd_problem import GuidedEpsilon

    if adapter is None:
        unet.disable_adapters()
    else:
        unet.set_adapters(adapter)
    head = None
    if log_variance is not None:
        head = LogVarianceOffset(len(schedule))
        head.values.data.copy_(log_variance)
    policy = GaussianStepPolicy(GuidedEpsilon(unet, 1.0), schedule, head)
    g, x = torch.Generator().manual_seed(seed), x_T
    cond = {"embeds": embeds, "uncond": None}
    with torch.no_grad():
        for step in range(len(schedule)):
            x = policy.sample(x, step, cond, g)
    unet.enable_adapters()
    return x


@pytest.mark.parametrize(("weights", "adapter"), [([1.0, 0.0], "alpha"), ([0.0, 1.0], "beta"), ([0.0, 0.0], None)])
def test_one_hot_and_zero_weights_reproduce_single_models(unet_with_two_adapters, weights, adapter):
    from composition.sampler import BaseKernel, MSDDASampler
    from training.policy import DDIMSchedule
    from training.toy import make_scheduler

    unet = unet_with_two_adapters
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 4, 1.0)
    log_var = {"alpha": torch.full((4, 1), -0.2), "beta": torch.full((4, 1), 0.1)}
    kernels = [BaseKernel("alpha", log_var["alpha"], 0.01), BaseKernel("beta", log_var["beta"], 0.01)]
    x_T, embeds, uncond = _sampler_inputs(unet)
    result = MSDDASampler(unet, schedule, 1.0, kernels).sample(x_T, embeds, uncond, weights,
                                                               torch.Generator().manual_seed(3))
    expected = _single_chain(unet, schedule, adapter, x_T, embeds, log_var.get(adapter), seed=3)
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-4)
    assert result.nfe_per_image == 4, "one UNet row per image and step"


def test_equal_variances_on_the_simplex_blend_epsilons(unet_with_two_adapters):
    from composition.sampler import BaseKernel, MSDDASampler
    from training.policy import DDIMSchedule, ddim_mean
    from training.toy import make_scheduler

    unet = unet_with_two_adapters
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 3, 1.0)
    kernels = [BaseKernel("alpha", None, 0.01), BaseKernel("beta", None, 0.01)]
    sampler = MSDDASampler(unet, schedule, 1.0, kernels)
    x_T, embeds, uncond = _sampler_inputs(unet, seed=1)
    result = sampler.sample(x_T, embeds, uncond, [0.3, 0.7], torch.Generator().manual_seed(5))
    g, x = torch.Generator().manual_seed(5), x_T
    for step in range(3):
        eps = sampler.epsilons(x, step, embeds, uncond, ["alpha", "beta"])
        blend = 0.3 * eps[0] + 0.7 * eps[1]
        s = schedule
        x = ddim_mean(x, blend, s.alpha[step], s.alpha_prev[step], s.sigma[step]) + s.sigma[step] * torch.randn(
            x.shape, generator=g)
    torch.testing.assert_close(result.latents, x, rtol=1e-4, atol=1e-4)
    assert result.nfe_per_image == 2 * 3, "K rows per step, no reference when sum(w) = 1"
    off = sampler.sample(x_T, embeds, uncond, [0.3, 0.3], torch.Generator().manual_seed(5))
    assert off.nfe_per_image == 3 * 3, "the reference joins the batch when sum(w) != 1"
