"""runtime.device and runtime.dtype: every stage places its tensors on the resolved device, ``auto`` is the
CPU here, and CUDA where there is none is a one-line error (exit 2 from the CLI)."""

import copy

import pytest
import torch

from training.device import DeviceError, place_pipeline, resolve_device, resolve_runtime

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def with_runtime(config, **runtime):
    return config.model_copy(update={"runtime": config.runtime.model_copy(update=runtime)})


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@no_cuda
def test_cuda_without_cuda_fails_in_one_line_at_every_stage_entry(tiny_config, tmp_path):
    from flows.jobs import compose_job, sweep_job, train_job
    from training.reference.embedded import pretrain_reference
    from training.reference.loader import load_reference_pipeline

    config = with_runtime(tiny_config, device="cuda")
    home = tmp_path / "home"
    stages = {
        "pretrain": lambda: pretrain_reference(config, home, progress=False),
        "reference": lambda: load_reference_pipeline(config, home, progress=False),
        "train": lambda: train_job(config, home, "ink_economy", register=False, mlflow=False),
        "compose": lambda: compose_job(config, home, "0.5,0.5", mlflow=False),
        "sweep": lambda: sweep_job(config, home, mlflow=False),
    }
    for name, run in stages.items():
        with pytest.raises(DeviceError) as raised:
            run()
        message = str(raised.value)
        assert "\n" not in message and "cuda" in message, name
    assert not (home / "reference").exists(), "nothing was built before the error"


@no_cuda
def test_cli_exits_2_with_one_line_for_cuda_without_cuda(tmp_path, tiny_config_file):
    import yaml

    from tests.helpers import run_msdda

    data = yaml.safe_load(tiny_config_file.read_text())
    tiny_config_file.write_text(yaml.safe_dump({**data, "runtime": {"device": "cuda"}}))
    result = run_msdda(
        ["train", "--objective", "ink_economy", "--config", str(tiny_config_file), "--no-mlflow"],
        tmp_path,
        tmp_path / "home",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device 'cuda'"), result.stderr[-2000:]


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_composition_runs_on_the_resolved_device(tiny_config, tiny_home, tiny_base_models, device):
    from composition.engine import generate, load_ensemble, score_generated

    config = with_runtime(tiny_config, device=device)
    ensemble = load_ensemble(config, tiny_home, tiny_base_models)
    expected = resolve_runtime(config.runtime)[0]
    for module in (ensemble.pipe.unet, ensemble.pipe.vae, ensemble.pipe.text_encoder):
        assert {t.device for t in [*module.parameters(), *module.buffers()]} == {expected}
    generated = generate(ensemble, "msdda", [0.5, 0.5], config.composition, num_images=2)
    assert generated.images.device.type == "cpu"  # saved and plotted from the CPU
    rewards = score_generated(ensemble, generated)
    assert all(r.device.type == "cpu" and r.shape == (2,) for r in rewards.values())


def test_trainer_accelerator_follows_the_device(tiny_config):
    from training.analysis.toy import ToyProblem
    from training.trainer import setup_run

    config = tiny_config.train.model_copy(update={"iterations": 1, "checkpoint_every": 0})
    run = setup_run(ToyProblem(num_inference_steps=4), config, None, device=torch.device("cpu"))
    assert run.accelerator.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in run.trainable)


def test_problem_and_its_buffers_follow_the_runtime_device(tiny_config, tiny_home):
    from training.base_model import evaluation_problem

    problem = evaluation_problem(with_runtime(tiny_config, device="cpu"), tiny_home, None)
    tensors = [*problem.parameters(), *problem.buffers()]
    assert tensors and {t.device for t in tensors} == {torch.device("cpu")}


def test_place_pipeline_moves_every_weight_and_buffer(tiny_reference):
    """On the meta device (no memory, any machine): every parameter and buffer of every model moves and takes
    the dtype, the LoRA adapters included."""
    from peft import LoraConfig

    from training.card import LORA_TARGETS
    from training.reference.embedded import load_embedded_pipeline

    pipe = load_embedded_pipeline(tiny_reference.path)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name="a")
    place_pipeline(pipe, torch.device("meta"), torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        floats = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
        assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}, name
        assert {t.dtype for t in floats} == {torch.bfloat16}, name
    assert any("lora_A" in n for n, p in pipe.unet.named_parameters() if p.device.type == "meta")


def test_rewards_follow_the_images_device(tiny_config, tiny_home, tiny_reference):
    """Each offline reward's models, tokens and buffers follow its images: on meta images the reward is a
    meta tensor (a CPU-held classifier or prototype would fail to mix with them)."""
    from training.rewards import load_reward

    images = torch.zeros(3, 3, 16, 16, device="meta")
    prompts = ["a handwritten digit seven", "handwritten three", "a handwritten digit one"]
    for name in ("digit_alignment", "prototype_match", "ink_economy", "symmetry"):
        reward = load_reward(name, tiny_config, tiny_home)
        value = reward(images, prompts)
        assert value.device.type == "meta" and value.shape == (3,), name


def test_reduced_precision_reference_samples_fp32_images(tiny_config, tiny_home, tiny_base_models):
    """runtime.dtype bf16: the reference's frozen weights (and the adapters on them) in bf16, latents,
    epsilons and images in fp32."""
    from composition.engine import generate, load_ensemble

    config = with_runtime(tiny_config, device="cpu", dtype="bf16")
    ensemble = load_ensemble(config, tiny_home, tiny_base_models)
    assert {p.dtype for p in ensemble.pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ensemble.pipe.vae.parameters()} == {torch.bfloat16}
    generated = generate(ensemble, "msdda", [0.5, 0.5], config.composition, num_images=2)
    assert generated.images.dtype == torch.float32 and torch.isfinite(generated.images).all()
    fp32 = load_ensemble(with_runtime(tiny_config, device="cpu"), tiny_home, tiny_base_models)
    reference = generate(fp32, "msdda", [0.5, 0.5], config.composition, num_images=2)
    assert (generated.images - reference.images).abs().mean() < 0.1  # the same images, rounded


def test_guided_epsilon_runs_the_unet_in_its_dtype(unet_with_two_adapters):
    from training.step.policy import GuidedEpsilon

    unet = copy.deepcopy(unet_with_two_adapters).to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8)
    cond = {"embeds": torch.randn(2, 16, unet.config.cross_attention_dim), "uncond": None}
    with torch.no_grad():
        eps = GuidedEpsilon(unet, 1.0)(x, torch.full((2,), 500), cond)
    assert eps.dtype == torch.float32 and eps.shape == x.shape
