"""Every stage on CUDA gives what it gives on the CPU (marked ``gpu``; skipped where there is no CUDA).

Run them with ``pytest -m gpu tests/test_gpu.py`` on a machine with a GPU. Each compares the CUDA run with the
same run on the CPU (same seeds; the sampler's noise is drawn on the CPU and moved), so a tensor left on the
wrong device fails loudly and a wrong result fails the comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import copy_pretrained, own_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def _full_precision_fp32():
    """CUDA's TF32 convolutions round to 10 bits: off, so fp32 on CUDA is comparable with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on(config, device: str, dtype: str = "fp32"):
    return config.model_copy(
        update={"runtime": config.runtime.model_copy(update={"device": device, "dtype": dtype})}
    )


def test_pretraining_runs_on_cuda(tiny_config, tmp_path):
    from training.reference.embedded import load_embedded_pipeline, pretrain_reference

    config = _on(tiny_config, "cuda")
    pretrain = config.pretrain.model_copy(update={"vae_steps": 3, "unet_steps": 3, "classifier_steps": 3})
    reference = pretrain_reference(config.model_copy(update={"pretrain": pretrain}), tmp_path, progress=False)
    unet = load_embedded_pipeline(reference.path).unet
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_trainer_on_cuda_matches_the_cpu_for_each_default_objective(
    tiny_config, tiny_home, tiny_reference, tmp_path
):
    """A few iterations of the step-level trainer per default objective, on CUDA and on the CPU from the same
    reference and seeds: the same LoRA weights and variance offsets (up to float rounding)."""
    from training.base_model import train_base_model
    from training.card import load_base_model

    train = tiny_config.train.model_copy(update={"iterations": 2, "checkpoint_every": 0})
    for objective in tiny_config.objective_names:
        trained = {}
        for run, device in enumerate(("cpu", "cuda")):
            home = copy_pretrained(tiny_home, tmp_path / f"{objective}-{run}")
            config = _on(tiny_config, device).model_copy(update={"train": train})
            result = train_base_model(config, objective, home, progress=False)
            assert not result.cached and result.unet_evaluations > 0
            trained[device] = load_base_model(result.path)
        cpu, cuda = trained["cpu"], trained["cuda"]
        assert cpu.lora.keys() == cuda.lora.keys()
        # lora_B starts at zero: what training wrote. Adam's steps have size ~lr whatever the gradient, so
        # compare the whole update, not each entry (an entry with a near-zero gradient can flip its sign).
        for key in [k for k in cpu.lora if ".lora_B." in k]:
            update = cpu.lora[key].norm()
            assert update > 0, f"{objective}: {key} was not trained"
            assert (cuda.lora[key] - cpu.lora[key]).norm() <= 0.1 * update, f"{objective}: {key}"
        for key in [k for k in cpu.lora if ".lora_B." not in k]:
            torch.testing.assert_close(cuda.lora[key], cpu.lora[key], rtol=1e-3, atol=1e-3, msg=key)
        torch.testing.assert_close(cuda.log_variance, cpu.log_variance, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("plan", ["one_call", "per_model"])
def test_composition_on_cuda_matches_the_cpu(tiny_config, tiny_home, tiny_base_models, plan):
    """MSDDA's images on CUDA (fp32, and fp16 within fp16's rounding) are the CPU's."""
    from composition.engine import generate, load_ensemble

    options = tiny_config.composition.model_copy(update={"plan": plan})
    images = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16")):
        ensemble = load_ensemble(_on(tiny_config, device, dtype), tiny_home, tiny_base_models)
        assert ensemble.device.type == device
        generated = generate(ensemble, "msdda", [0.3, 0.7], options, num_images=4)
        assert generated.images.device.type == "cpu"
        images[device, dtype] = generated.images
    torch.testing.assert_close(images["cuda", "fp32"], images["cpu", "fp32"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(images["cuda", "fp16"], images["cpu", "fp32"], rtol=0, atol=0.05)


@pytest.mark.parametrize("weights", ["merged", "lora"])
@torch.no_grad()
def test_routed_and_compiled_routed_steps_on_cuda(unet_with_two_adapters, weights):
    """On CUDA in fp16, the routed call gives each adapter's own forward, and the compiled UNet
    (``compile_unet``: inductor with CUDA graphs) gives the eager routed call."""
    from composition.batched import REFERENCE, compile_unet, mixed_adapter_batch, routing

    unet = copy.deepcopy(unet_with_two_adapters).to(device="cuda", dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to("cuda", torch.float16)
    context = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g).to("cuda", torch.float16)
    t = torch.full((2,), 500, device="cuda")
    expected = [own_forward(unet, name, x, t, context) for name in ("alpha", "beta", None)]
    names = routing(["alpha", "beta", REFERENCE], 2)
    args = (x.repeat(3, 1, 1, 1), t.repeat(3))
    with mixed_adapter_batch(unet, names, weights):
        eager = unet(*args, encoder_hidden_states=context.repeat(3, 1, 1)).sample
    for i, want in enumerate(expected):
        torch.testing.assert_close(eager[2 * i : 2 * (i + 1)], want, rtol=1e-2, atol=1e-2)
    compiled = compile_unet(unet)
    for _ in range(3):  # compile, record the CUDA graph, replay it
        with mixed_adapter_batch(unet, names, weights):
            got = compiled(*args, encoder_hidden_states=context.repeat(3, 1, 1)).sample.clone()
    torch.testing.assert_close(got, eager, rtol=1e-2, atol=1e-2)
