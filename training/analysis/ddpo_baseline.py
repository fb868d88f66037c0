"""The DDPO baseline: trl 0.23.1's ``DDPOTrainer`` (the last trl release that has it) on our pipeline and
reward.

trl removed DDPO after 0.23.1, so the ``ddpo`` extra pins ``trl==0.23.1``. Two adaptations, both outside trl's
maths: accelerate's state is initialised before trl's pipeline logs through it, and without classifier-free
guidance (guidance <= 1) the prompt encoder returns only the positive embeddings (trl's ``pipeline_step``
calls diffusers' deprecated ``_encode_prompt``, which always concatenates negative and positive ones).
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configs.schema import PipelineConfig
from training.rewards import Reward


@dataclass
class DDPOHistory:
    """Per epoch: UNet rows evaluated so far (sampling + training) and the on-policy mean reward.

    ``snapshots`` (with ``snapshot_every``): the LoRA weights of the policy that sampled every
    ``snapshot_every``-th epoch, and of the final one, as ``{"epoch", "unet_evaluations", "adapter"}``; the
    adapter's keys are peft's (those of :func:`training.sd_problem.lora_state_dict`)."""

    unet_evaluations: list[int] = field(default_factory=list)
    reward_mean: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)


def _pipeline_class():
    try:
        from trl import DefaultDDPOStableDiffusionPipeline
    except ImportError:
        raise ImportError("the DDPO baseline needs trl 0.23.1: pip install -e '.[ddpo]'") from None

    class OfflinePipeline(DefaultDDPOStableDiffusionPipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sd = self.sd_pipeline

            def encode(
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt=None,
                prompt_embeds=None,
                negative_prompt_embeds=None,
                lora_scale=None,
                **kw,
            ):
                pos, neg = sd.encode_prompt(
                    prompt,
                    device,
                    num_images_per_prompt,
                    do_classifier_free_guidance,
                    negative_prompt,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds if do_classifier_free_guidance else None,
                    lora_scale=lora_scale,
                    **kw,
                )
                return torch.cat([neg, pos]) if do_classifier_free_guidance else pos

            sd._encode_prompt = encode

    return OfflinePipeline


def run_ddpo(
    config: PipelineConfig,
    reference_path: Path,
    reward: Reward,
    prompts: list[str],
    epochs: int,
    out_dir: Path,
    sample_batch_size: int = 32,
    train_batch_size: int = 8,
    learning_rate: float = 3e-4,
    seed: int = 0,
    snapshot_every: int = 0,
) -> DDPOHistory:
    """Train DDPO (LoRA) for ``epochs``; returns its reward-versus-UNet-evaluations history (and, with
    ``snapshot_every``, the adapter every that many epochs and at the end)."""
    from accelerate import PartialState

    from training.sd_problem import lora_state_dict

    pipeline_class = _pipeline_class()
    from trl import DDPOConfig, DDPOTrainer

    guided = config.sampling.guidance_scale > 1.0
    ddpo_config = DDPOConfig(
        num_epochs=epochs,
        sample_batch_size=sample_batch_size,
        sample_num_batches_per_epoch=1,
        train_batch_size=train_batch_size,
        sample_num_steps=config.sampling.num_inference_steps,
        sample_eta=config.sampling.eta,
        sample_guidance_scale=config.sampling.guidance_scale,
        train_cfg=guided,
        train_learning_rate=learning_rate,
        mixed_precision="no",
        allow_tf32=False,
        log_with=None,
        save_freq=epochs + 1,
        project_kwargs={"project_dir": str(out_dir), "automatic_checkpoint_naming": True, "total_limit": 1},
        accelerator_kwargs={"cpu": not torch.cuda.is_available()},
        seed=seed,
    )
    PartialState(cpu=not torch.cuda.is_available())
    pipe = pipeline_class(str(reference_path), use_lora=True)
    rows = {"n": 0}
    pipe.unet.register_forward_hook(
        lambda module, args, output: rows.__setitem__("n", rows["n"] + args[0].shape[0])
    )
    rng = random.Random(seed)

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, batch_prompts, metadata):
        with torch.no_grad():
            return reward(images.float(), list(batch_prompts)).detach(), {}

    with warnings.catch_warnings():  # trl 0.23.1 is pinned for this baseline, knowing DDPO is deprecated
        warnings.filterwarnings(
            "ignore", message="DDPOTrainer is deprecated", category=DeprecationWarning, module=r"trl\."
        )
        trainer = DDPOTrainer(ddpo_config, reward_fn, prompt_fn, pipe)
    history = DDPOHistory()
    original_log, original_step = trainer.accelerator.log, trainer.step
    start = time.perf_counter()

    def log(values, step=None, log_kwargs=None):
        if "reward_mean" in values:
            # logged right after sampling: the reward of the current policy, with the rows used so far
            history.reward_mean.append(float(values["reward_mean"]))
            history.unet_evaluations.append(rows["n"])
            history.seconds.append(time.perf_counter() - start)
            epoch = len(history.reward_mean) - 1
            if snapshot_every and epoch % snapshot_every == 0:
                snapshot(epoch)
        return original_log(values, step=step, log_kwargs=log_kwargs or {})

    def snapshot(epoch):
        adapter = lora_state_dict(pipe.sd_pipeline.unet)
        history.snapshots.append({"epoch": epoch, "unet_evaluations": rows["n"], "adapter": adapter})

    trainer.accelerator.log = log
    trainer.step = original_step
    trainer.train()
    if snapshot_every:
        snapshot(epochs)
    return history
