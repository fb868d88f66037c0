"""Batched LoRA routing (``mixed_adapter_batch`` + ``routing``) equals one peft forward per adapter, under
classifier-free guidance (the batch stacked twice, [uncond; cond]), for adapters of different ranks, for LoRA
on convolutions and for base models with different target sets."""

import warnings

import pytest
import torch

from composition.batched import REFERENCE, load_adapter, mixed_adapter_batch, routing
from tests.helpers import random_lora, unet_inputs
from training.card import LORA_TARGETS, LoraSpec
from training.step.policy import cfg_epsilon

GUIDANCE = 7.5
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

# target sets (peft target_modules) of issue 21: attention, + the ResNet convolutions, + the rest ("broad")
ATTENTION = LORA_TARGETS
RESNET = [*ATTENTION, "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
BROAD = [*RESNET, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv_in", "conv_out"]


def _unet_with_adapters(reference_path, adapters: dict[str, int | LoraSpec]):
    """The tiny reference UNet with a random LoRA adapter per name: of rank ``adapters[name]`` on the
    attention projections, or of that ``LoraSpec``."""
    from peft import LoraConfig, get_peft_model_state_dict

    from training.reference.embedded import load_embedded_pipeline

    unet = load_embedded_pipeline(reference_path).unet
    for seed, (name, spec) in enumerate(adapters.items()):
        if isinstance(spec, int):
            spec = LoraSpec(rank=spec, targets=LORA_TARGETS)
        with warnings.catch_warnings():  # a probe adapter for the shapes, next to the others
            warnings.simplefilter("ignore", UserWarning)
            unet.add_adapter(LoraConfig(**spec.lora_config_kwargs()), adapter_name="probe")
            shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet, adapter_name="probe").items()}
            unet.delete_adapters("probe")
        state = random_lora(shapes, seed=seed, scale=0.1)  # B too: nonzero
        load_adapter(unet, name, state, spec)
    return unet.eval()


@pytest.fixture(scope="module")
def same_rank_unet(tiny_reference):
    return _unet_with_adapters(tiny_reference.path, {"alpha": 4, "beta": 4})


@pytest.fixture(scope="module")
def mixed_rank_unet(tiny_reference):
    return _unet_with_adapters(tiny_reference.path, {"low": 2, "high": 6})


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


def _batched(unet, names, x, t, embeds, uncond, guidance, weights="merged", forward=None):
    """All adapters in one forward (``forward``: the UNet unless given, e.g. compiled), stacked as the
    composition code stacks them: K slices of B rows, and under guidance that whole batch twice,
    [uncond; cond]; returns ``[K, B, ...]``."""
    forward = unet if forward is None else forward
    n, b = len(names), x.shape[0]
    xs, ts, cs, us = x.repeat(n, 1, 1, 1), t.repeat(n), embeds.repeat(n, 1, 1), uncond.repeat(n, 1, 1)
    with mixed_adapter_batch(unet, routing(names, b), weights):
        if guidance == 1.0:
            eps = forward(xs, ts, encoder_hidden_states=cs).sample
        else:
            out = forward(torch.cat([xs, xs]), torch.cat([ts, ts]), encoder_hidden_states=torch.cat([us, cs]))
            eps_uncond, eps_cond = out.sample.chunk(2)
            eps = cfg_epsilon(eps_cond, eps_uncond, guidance)
    return eps.view(n, b, *x.shape[1:])


def _check(unet, names, guidance, weights="merged", forward=None):
    x, t, embeds, uncond = unet_inputs(unet, batch=3, uncond=True)
    batched = _batched(unet, names, x, t, embeds, uncond, guidance, weights, forward)
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
    from training.analysis.toy import make_scheduler
    from training.step.kernel import DDIMSchedule

    unet = same_rank_unet
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), 4, 1.0)
    models = [SimpleNamespace(objective=name, beta=0.01, log_variance=None) for name in ("alpha", "beta")]
    composer = Composer(unet, schedule, GUIDANCE, models, options=None)
    x, _, embeds, uncond = unet_inputs(unet, batch=3, seed=1, uncond=True)
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


# ------------------------------------------------------------------- LoRA on convolutions, mixed target sets


@pytest.fixture(scope="module")
def conv_unet(tiny_reference):
    """Two conv-adapted models: the broad set plus the stride-2 downsampler (``conv``) at rank 3, alpha 6, and
    the ResNet set at rank 2."""
    adapters = {
        "alpha": LoraSpec(rank=3, alpha=6.0, targets=[*BROAD, "conv"]),
        "beta": LoraSpec(rank=2, targets=RESNET),
    }
    return _unet_with_adapters(tiny_reference.path, adapters)


@pytest.fixture(scope="module")
def mixed_set_unet(tiny_reference):
    """An attention-only model (rank 4) next to a broad one (rank 3, alpha 1.5)."""
    adapters = {"attention": 4, "broad": LoraSpec(rank=3, alpha=1.5, targets=BROAD)}
    return _unet_with_adapters(tiny_reference.path, adapters)


@pytest.mark.parametrize("weights", ["merged", "lora"])
@pytest.mark.parametrize("guidance", [1.0, GUIDANCE])
@torch.no_grad()
def test_routing_of_lora_on_convolutions(conv_unet, weights, guidance):
    """Conv-adapted models (3x3 and 1x1 convolutions, the stride-2 downsampler) routed in one forward, with
    and without the reference slice, give each model's own peft forward."""
    from peft.tuners.lora import Conv2d as LoraConv2d

    down = dict(conv_unet.named_modules())["down_blocks.0.downsamplers.0.conv"]
    assert isinstance(down, LoraConv2d) and down.base_layer.stride == (2, 2) and set(down.lora_A) == {"alpha"}
    _check(conv_unet, ["alpha", "beta", REFERENCE], guidance, weights)
    _check(conv_unet, ["beta", "alpha"], guidance, weights)


@torch.no_grad()
def test_merged_conv_kernels_are_peft_merges(conv_unet):
    """The merged routed weight's delta ``s Delta`` is peft's own ``get_delta_weight`` on every layer."""
    from composition.batched import lora_delta, lora_layers

    kinds = set()
    for module in lora_layers(conv_unet):
        kinds.add(tuple(module.base_layer.weight.shape[2:]))
        for name in module.lora_A:
            scaled = module.scaling[name] * lora_delta(module, name)
            torch.testing.assert_close(scaled, module.get_delta_weight(name))
    assert {(), (1, 1), (3, 3)} <= kinds  # linear layers, 1x1 and 3x3 convolutions


@pytest.mark.parametrize("weights", ["merged", "lora"])
@pytest.mark.parametrize("guidance", [1.0, GUIDANCE])
@torch.no_grad()
def test_routing_of_models_with_different_target_sets(mixed_set_unet, weights, guidance):
    """A layer only the broad model adapts gives the attention model's slice its base output, as that
    model's own forward does; in one call with the reference, and one model alone (the per-model plan)."""
    _check(mixed_set_unet, ["attention", "broad", REFERENCE], guidance, weights)
    _check(mixed_set_unet, ["broad", "attention"], guidance, weights)
    _check(mixed_set_unet, ["attention"], guidance, weights)


def test_unknown_adapter_names_still_raise(mixed_set_unet):
    routed = mixed_adapter_batch(mixed_set_unet, routing(["attention", "gamma"], 2))
    with pytest.raises(ValueError, match="no adapter named 'gamma'"), routed:
        pass


@torch.no_grad()
def test_compiled_routing_of_convolutions_and_mixed_sets(mixed_set_unet):
    """``compile_unet`` (backend "eager": dynamo's tracing and guards without codegen) over an attention model
    and a broad one, both routed weights (a re-routing recompiles: two routings keep it to seconds): the
    separate forwards."""
    from composition.batched import compile_unet

    compiled = compile_unet(mixed_set_unet, backend="eager")
    _check(mixed_set_unet, ["attention", "broad", REFERENCE], GUIDANCE, "merged", forward=compiled)
    _check(mixed_set_unet, ["broad", "attention"], 1.0, "lora", forward=compiled)


def _adapter_state(unet, name):
    """Adapter ``name``'s peft state dict, without the adapter name (the saved format)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=name)
    return {k.replace(f".{name}.", "."): v for k, v in state.items()}


@torch.no_grad()
def test_rewarded_soup_of_conv_and_mixed_target_sets(mixed_set_unet):
    """``Composer.load_soup`` of an attention model and a broad one: conv layers in the soup, each layer's
    rank the sum over the models adapting it, and its forward that of both adapters active at the soup's
    weights (peft sums their deltas); loaded again with other weights, too."""
    import copy
    from types import SimpleNamespace

    from composition.methods import SOUP_ADAPTER, Composer

    unet = copy.deepcopy(mixed_set_unet)
    specs = {
        "attention": LoraSpec(rank=4, targets=ATTENTION),
        "broad": LoraSpec(rank=3, alpha=1.5, targets=BROAD),
    }
    models = [
        SimpleNamespace(
            objective=name,
            beta=0.01,
            log_variance=None,
            lora=_adapter_state(unet, name),
            card=SimpleNamespace(lora=spec),
            rank=spec.rank,
            targets=spec.targets,
        )
        for name, spec in specs.items()
    ]
    composer = Composer(unet, None, 1.0, models, options=None)
    x, t, embeds, uncond = unet_inputs(unet, batch=3, uncond=True)
    reference = _separate(unet, None, x, t, embeds, uncond, 1.0)
    for weights in ([0.3, 0.9], [0.8, 0.5]):
        composer.load_soup(weights)
        soup = _separate(unet, SOUP_ADAPTER, x, t, embeds, uncond, 1.0)
        unet.set_adapters(list(specs), weights=weights)  # each adapter's scaling times its weight
        expected = unet(x, t, encoder_hidden_states=embeds).sample
        unet.set_adapters(list(specs), weights=[1.0, 1.0])
        torch.testing.assert_close(soup, expected, **TOLERANCE)
        assert (soup - reference).abs().max() > 1e-2
    layers = dict(unet.named_modules())
    conv = layers["down_blocks.0.resnets.0.conv1"]
    query = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert conv.lora_A[SOUP_ADAPTER].weight.shape[:2] == (3, 16) and conv.scaling[SOUP_ADAPTER] == 1.0
    assert query.lora_A[SOUP_ADAPTER].weight.shape[0] == 7 and query.scaling[SOUP_ADAPTER] == 1.0
    for weights in ("merged", "lora"):  # the soup routed next to a model of another target set
        _check(unet, [SOUP_ADAPTER, "attention"], GUIDANCE, weights)
