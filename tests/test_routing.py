"""Batched LoRA routing (``mixed_adapter_batch`` + ``routing``) equals one peft forward per adapter, under
classifier-free guidance (the batch stacked twice, [uncond; cond]) and for adapters of different ranks."""

import warnings

import pytest
import torch

from composition.batched import REFERENCE, load_adapter, mixed_adapter_batch, routing
from training.card import LORA_TARGETS, LoraSpec
from training.policy import cfg_epsilon

GUIDANCE = 7.5
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _unet_with_adapters(reference_path, ranks: dict[str, int]):
    """The tiny reference UNet with a random LoRA adapter of rank ``ranks[name]`` per name."""
    from peft import LoraConfig, get_peft_model_state_dict

    from training.embedded import load_embedded_pipeline

    unet = load_embedded_pipeline(reference_path).unet
    for seed, (name, rank) in enumerate(ranks.items()):
        with warnings.catch_warnings():  # a probe adapter for the shapes, next to the others
            warnings.simplefilter("ignore", UserWarning)
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS)
            unet.add_adapter(config, adapter_name="probe")
            shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet, adapter_name="probe").items()}
            unet.delete_adapters("probe")
        g = torch.Generator().manual_seed(seed)
        state = {k: 0.1 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
        load_adapter(unet, name, state, LoraSpec(rank=rank, targets=LORA_TARGETS))
    return unet.eval()


@pytest.fixture(scope="module")
def same_rank_unet(tiny_reference):
    return _unet_with_adapters(tiny_reference.path, {"alpha": 4, "beta": 4})


@pytest.fixture(scope="module")
def mixed_rank_unet(tiny_reference):
    return _unet_with_adapters(tiny_reference.path, {"low": 2, "high": 6})


def _inputs(unet, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 500)
    embeds = torch.randn(batch, 16, dim, generator=g)
    uncond = torch.randn(1, 16, dim, generator=g).expand(batch, -1, -1)
    return x, t, embeds, uncond


def _separate(unet, name, x, t, embeds, uncond, guidance):
    """One adapter (``None``: the reference) on its own, through peft's own LoRA forward."""
    if name is None:
        unet.disable_adapters()
    else:
        unet.set_adapter(name)
    try:
        if guidance == 1.0:
            return unet(x, t, encoder_hidden_states=embeds).sample
        eps_uncond, eps_cond = unet(
            torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, embeds])
        ).sample.chunk(2)
        return cfg_epsilon(eps_cond, eps_uncond, guidance)
    finally:
        unet.enable_adapters()


def _batched(unet, names, x, t, embeds, uncond, guidance):
    """All adapters in one forward, stacked as the composition code stacks them: K slices of B rows, and under
    guidance that whole batch twice, [uncond; cond]; returns ``[K, B, ...]``."""
    n, b = len(names), x.shape[0]
    xs, ts, cs, us = x.repeat(n, 1, 1, 1), t.repeat(n), embeds.repeat(n, 1, 1), uncond.repeat(n, 1, 1)
    with mixed_adapter_batch(unet, routing(names, b)):
        if guidance == 1.0:
            eps = unet(xs, ts, encoder_hidden_states=cs).sample
        else:
            out = unet(torch.cat([xs, xs]), torch.cat([ts, ts]), encoder_hidden_states=torch.cat([us, cs]))
            eps_uncond, eps_cond = out.sample.chunk(2)
            eps = cfg_epsilon(eps_cond, eps_uncond, guidance)
    return eps.view(n, b, *x.shape[1:])


def _check(unet, names, guidance):
    x, t, embeds, uncond = _inputs(unet)
    batched = _batched(unet, names, x, t, embeds, uncond, guidance)
    expected = [
        _separate(unet, None if name == REFERENCE else name, x, t, embeds, uncond, guidance) for name in names
    ]
    for name, got, want in zip(names, batched, expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    # the comparison has teeth: every adapter's output differs from the reference's and from the others'
    for i in range(len(expected)):
        for j in range(i + 1, len(expected)):
            assert (expected[i] - expected[j]).abs().max() > 1e-2, (names[i], names[j])
    return batched


@torch.no_grad()
def test_routing_under_classifier_free_guidance(same_rank_unet):
    _check(same_rank_unet, ["alpha", "beta", REFERENCE], GUIDANCE)


@torch.no_grad()
def test_routing_under_guidance_is_what_the_sampler_uses(same_rank_unet):
    """``Composer.epsilons`` (the composition methods' UNet call) gives the separate guided forwards."""
    from types import SimpleNamespace

    from composition.methods import Batch, Composer
    from training.kernel import DDIMSchedule
    from training.toy import make_scheduler

    unet = same_rank_unet
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 4, 1.0)
    models = [SimpleNamespace(objective=name, beta=0.01, log_variance=None) for name in ("alpha", "beta")]
    composer = Composer(unet, schedule, GUIDANCE, models, options=None)
    x, _, embeds, uncond = _inputs(unet, seed=1)
    t = schedule.timesteps[2].expand(x.shape[0])
    names = ["beta", REFERENCE, "alpha"]
    eps = composer.epsilons(x, 2, Batch(embeds, uncond[:1]), names)
    for name, got in zip(names, eps, strict=True):
        want = _separate(unet, None if name == REFERENCE else name, x, t, embeds, uncond, GUIDANCE)
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("guidance", [1.0, GUIDANCE])
@torch.no_grad()
def test_routing_with_adapters_of_different_ranks(mixed_rank_unet, guidance):
    unet = mixed_rank_unet
    layer = next(m for m in unet.modules() if hasattr(m, "lora_A") and "low" in m.lora_A)
    assert layer.lora_A["low"].weight.shape[0] == 2 and layer.lora_A["high"].weight.shape[0] == 6
    _check(unet, ["low", "high", REFERENCE], guidance)
    _check(unet, ["high", "low"], guidance)  # no reference slice, the other order
