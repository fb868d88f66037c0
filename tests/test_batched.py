"""K LoRA base models in one batched UNet forward give exactly the per-adapter forwards."""

import pytest
import torch

from composition.batched import REFERENCE, mixed_adapter_batch, routing


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
        batched = unet(
            x.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=context.repeat(3, 1, 1)
        ).sample
    for i, expected in enumerate(separate):
        torch.testing.assert_close(batched[3 * i : 3 * (i + 1)], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(separate[0], separate[1]), "the adapters really differ"
    assert not torch.allclose(separate[0], separate[2])


def test_routing_must_divide_the_batch(unet_with_two_adapters):
    unet = unet_with_two_adapters
    with mixed_adapter_batch(unet, ["alpha", "beta"]), pytest.raises(ValueError, match="does not split"):
        unet(
            torch.zeros(3, 4, 8, 8),
            torch.full((3,), 10),
            encoder_hidden_states=torch.zeros(3, 16, unet.config.cross_attention_dim),
        )
