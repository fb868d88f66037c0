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
