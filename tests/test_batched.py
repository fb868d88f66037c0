"""K LoRA base models in one batched UNet forward give exactly the per-adapter forwards."""

import copy

import pytest
import torch

from composition.batched import REFERENCE, mixed_adapter_batch, routing
from tests.conftest import own_forward
from tests.helpers import unet_inputs


@pytest.mark.parametrize("weights", ["merged", "lora"])
@torch.no_grad()
def test_mixed_batch_equals_separate_forwards(unet_with_two_adapters, weights):
    unet = unet_with_two_adapters
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.full((3,), 500)
    context = torch.randn(3, 16, unet.config.cross_attention_dim, generator=g)

    separate = [own_forward(unet, name, x, t, context) for name in ["alpha", "beta", None]]

    names = routing(["alpha", "beta", REFERENCE], 3)
    with mixed_adapter_batch(unet, names, weights):
        batched = unet(
            x.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=context.repeat(3, 1, 1)
        ).sample
    for i, expected in enumerate(separate):
        torch.testing.assert_close(batched[3 * i : 3 * (i + 1)], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(separate[0], separate[1]), "the adapters really differ"
    assert not torch.allclose(separate[0], separate[2])


@pytest.mark.parametrize("weights", ["merged", "lora"])
@torch.no_grad()
def test_copies_and_single_slices_route_like_the_adapter(unet_with_two_adapters, weights):
    """Two stacked copies of a routing (classifier-free guidance) and a one-adapter routing (the per-model
    plan) give the adapter's own forward."""
    unet = copy.deepcopy(unet_with_two_adapters)
    x, t, context = unet_inputs(unet)
    expected = {name: own_forward(unet, name, x, t, context) for name in ("alpha", "beta")}
    names = routing(["beta", "alpha"], 2)
    with mixed_adapter_batch(unet, names, weights):
        twice = unet(x.repeat(4, 1, 1, 1), t.repeat(4), encoder_hidden_states=context.repeat(4, 1, 1)).sample
    for copy_rows in twice.chunk(2):
        torch.testing.assert_close(copy_rows[:2], expected["beta"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(copy_rows[2:], expected["alpha"], rtol=1e-4, atol=1e-5)
    for name in ("alpha", "beta"):
        with mixed_adapter_batch(unet, routing([name], 2), weights):
            single = unet(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(single, expected[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'merged' or 'lora'"), mixed_adapter_batch(unet, names, "fused"):
        pass


def test_routing_must_divide_the_batch(unet_with_two_adapters):
    unet = unet_with_two_adapters
    with mixed_adapter_batch(unet, ["alpha", "beta"]), pytest.raises(ValueError, match="does not split"):
        unet(
            torch.zeros(3, 4, 8, 8),
            torch.full((3,), 10),
            encoder_hidden_states=torch.zeros(3, 16, unet.config.cross_attention_dim),
        )


def _routed(unet, names, x, t, context):
    n = len(names) // len(x)
    with mixed_adapter_batch(unet, names):
        return unet(x.repeat(n, 1, 1, 1), t.repeat(n), encoder_hidden_states=context.repeat(n, 1, 1)).sample


@pytest.fixture
def counted_builds(monkeypatch):
    """How often the stacked weights of a layer are built (composition.batched._stacked_weights calls)."""
    from composition import batched

    calls = []
    original = batched._stacked_weights

    def counting(module, slices, weights):
        calls.append(tuple(slices))
        return original(module, slices, weights)

    monkeypatch.setattr(batched, "_stacked_weights", counting)
    return calls


@torch.no_grad()
def test_stacked_weights_are_built_once_per_routing(unet_with_two_adapters, counted_builds):
    from composition.batched import lora_layers

    unet = copy.deepcopy(unet_with_two_adapters)  # a fresh cache (and no state shared with other tests)
    layers = len(lora_layers(unet))
    x, t, context = unet_inputs(unet)
    names = routing(["alpha", "beta"], 2)
    first = _routed(unet, names, x, t, context)
    for _ in range(3):  # the sampler enters the block every denoising step
        torch.testing.assert_close(_routed(unet, names, x, t, context), first, rtol=0, atol=0)
    assert len(counted_builds) == layers
    _routed(unet, routing(["beta", "alpha", REFERENCE], 2), x, t, context)  # another routing: its own build
    _routed(unet, names, x, t, context)
    assert len(counted_builds) == 2 * layers


@torch.no_grad()
def test_changed_adapter_weights_rebuild_the_stacked_weights(unet_with_two_adapters, counted_builds):
    from composition.batched import lora_layers

    unet = copy.deepcopy(unet_with_two_adapters)
    layers = lora_layers(unet)
    x, t, context = unet_inputs(unet)
    names = routing(["alpha", "beta"], 2)
    before = _routed(unet, names, x, t, context)
    layers[0].lora_B["alpha"].weight.add_(0.5)  # an in-place write, as an optimizer step or a load does
    after = _routed(unet, names, x, t, context)
    assert len(counted_builds) == len(layers) + 1, "only the changed layer is rebuilt"
    expected = own_forward(unet, "alpha", x, t, context)
    torch.testing.assert_close(after[:2], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after[:2], before[:2])
    torch.testing.assert_close(after[2:], before[2:], rtol=1e-4, atol=1e-5)  # beta's rows are unchanged


@torch.no_grad()
def test_loading_an_adapter_clears_the_cache(unet_with_two_adapters):
    from composition.batched import load_adapter, lora_layers
    from training.card import LORA_TARGETS, LoraSpec

    unet = copy.deepcopy(unet_with_two_adapters)
    x, t, context = unet_inputs(unet)
    _routed(unet, routing(["alpha", "beta"], 2), x, t, context)
    assert all(m.__dict__.get("_msdda_stacked_cache") for m in lora_layers(unet))
    state = {k.replace(".beta.", "."): v for k, v in _peft_state(unet, "beta").items()}
    load_adapter(unet, "gamma", state, LoraSpec(rank=4, targets=LORA_TARGETS))
    assert not any(m.__dict__.get("_msdda_stacked_cache") for m in lora_layers(unet))
    routed = _routed(unet, routing(["gamma", "alpha"], 2), x, t, context)
    torch.testing.assert_close(routed[:2], _routed(unet, routing(["beta"], 2), x, t, context))


def _peft_state(unet, name):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=name)


@torch.no_grad()
def test_compiled_routing_matches_eager_across_routings(unet_with_two_adapters):
    """Dynamo traces the routing hooks and guards on the route (backend "eager": the tracing without
    codegen, seconds on a CPU): routed, reference-only and re-routed calls of one compiled UNet match
    eager."""
    from composition.batched import compile_unet

    unet = copy.deepcopy(unet_with_two_adapters)
    compiled = compile_unet(unet, backend="eager")
    x, t, context = unet_inputs(unet)
    for names in (["alpha", "beta"], [REFERENCE], ["beta", "alpha"], ["alpha", "beta"]):
        rows = routing(names, 2)
        n = len(names)
        args = (x.repeat(n, 1, 1, 1), t.repeat(n))
        with mixed_adapter_batch(unet, rows):
            got = compiled(*args, encoder_hidden_states=context.repeat(n, 1, 1)).sample
        torch.testing.assert_close(got, _routed(unet, rows, x, t, context), rtol=1e-5, atol=1e-6)


def _has_cpp_compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor on the CPU needs a C++ compiler")
def test_composition_compile_gives_the_eager_images(tiny_config, tiny_home, tiny_base_models):
    """composition.compile (inductor, the default mode on the CPU): MSDDA's images match eager's. Slow: the
    tiny UNet takes about 2 minutes to compile on the project's 2 cores."""
    from composition.engine import generate, load_ensemble

    options = tiny_config.composition
    eager = load_ensemble(tiny_config, tiny_home, tiny_base_models)
    expected = generate(eager, "msdda", [0.5, 0.5], options, num_images=4)
    compiled = load_ensemble(tiny_config, tiny_home, tiny_base_models)
    got = generate(compiled, "msdda", [0.5, 0.5], options.model_copy(update={"compile": True}), num_images=4)
    assert "unet" in compiled._compiled
    torch.testing.assert_close(got.images, expected.images, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_routes_follow_new_adapters_and_moved_weights(unet_with_two_adapters, counted_builds):
    """The UNet-level caches (LoRA layers, routes) notice an adapter added without ``load_adapter``, a changed
    adapter scaling and weights moved to another dtype: the routed call still gives each adapter's forward."""
    from peft import LoraConfig

    from composition.batched import lora_layers
    from training.card import LORA_TARGETS

    unet = copy.deepcopy(unet_with_two_adapters)
    x, t, context = unet_inputs(unet)
    _routed(unet, routing(["alpha", "beta"], 2), x, t, context)
    builds = len(counted_builds)
    _routed(unet, routing(["alpha", "beta"], 2), x, t, context)
    assert len(counted_builds) == builds, "a second entry reuses the routes"
    layers = lora_layers(unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS), adapter_name="gamma")
    assert lora_layers(unet) is not layers
    for module in lora_layers(unet):
        module.lora_B["gamma"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    expected = own_forward(unet, "gamma", x, t, context)
    routed = _routed(unet, routing(["gamma", "alpha"], 2), x, t, context)
    torch.testing.assert_close(routed[:2], expected, rtol=1e-4, atol=1e-5)
    unet.set_adapters("gamma", weights=0.5)  # peft halves gamma's scaling on every layer
    half = unet(x, t, encoder_hidden_states=context).sample
    unet.enable_adapters()
    routed = _routed(unet, routing(["gamma", "alpha"], 2), x, t, context)
    torch.testing.assert_close(routed[:2], half, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(half, expected)
    unet.double()
    routed64 = _routed(unet, routing(["gamma", "alpha"], 2), x.double(), t, context.double())
    assert routed64.dtype == torch.float64
    torch.testing.assert_close(routed64.float(), routed, rtol=1e-4, atol=1e-5)


def test_soup_merge_of_conv_entries_and_modules_some_models_lack():
    """``merge_lora_states`` over conv entries (``A [r, in, 3, 3]``, ``B [out, r, 1, 1]``) and modules only
    some models adapt: each module's merged delta is the weighted sum over the models holding it, its rank
    the sum of their ranks; an ``A`` without its ``B`` is refused."""
    import torch.nn.functional as F

    from composition.soup import lora_ranks, merge_lora_states

    g = torch.Generator().manual_seed(0)

    def conv(r):
        return {
            "c.lora_A.weight": torch.randn(r, 5, 3, 3, generator=g),
            "c.lora_B.weight": torch.randn(6, r, 1, 1, generator=g),
        }

    def linear(r):
        return {
            "m.lora_A.weight": torch.randn(r, 7, generator=g),
            "m.lora_B.weight": torch.randn(3, r, generator=g),
        }

    def conv_delta(state):  # peft's get_delta_weight for a 3x3 conv LoRA (scaling 1)
        return F.conv2d(state["c.lora_A.weight"].transpose(0, 1), state["c.lora_B.weight"]).transpose(0, 1)

    states = [{**conv(2), **linear(2)}, conv(3), linear(4)]
    weights = [0.5, -1.0, 2.0]
    merged = merge_lora_states(states, weights)
    assert lora_ranks(merged) == {"c": 5, "m": 6}
    expected = 0.5 * conv_delta(states[0]) - conv_delta(states[1])
    torch.testing.assert_close(conv_delta(merged), expected, rtol=1e-5, atol=1e-5)
    expected = sum(
        w * s["m.lora_B.weight"] @ s["m.lora_A.weight"]
        for w, s in zip(weights, states)
        if "m.lora_A.weight" in s
    )
    torch.testing.assert_close(merged["m.lora_B.weight"] @ merged["m.lora_A.weight"], expected)
    with pytest.raises(ValueError, match="without m.lora_B.weight"):
        merge_lora_states([linear(2), {"m.lora_A.weight": torch.zeros(2, 7)}], [1.0, 1.0])


def test_routing_refuses_layers_it_cannot_compute_exactly():
    """A dilated convolution's LoRA (peft builds ``A`` undilated) has no exact merged kernel: a TypeError."""
    from peft import LoraConfig, inject_adapter_in_model

    from composition.batched import lora_layers

    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["0"]),
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, dilation=2, padding=2)),
    )
    with pytest.raises(TypeError, match="undilated"):
        lora_layers(model)
