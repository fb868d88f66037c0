"""The trainer's :class:`~training.trainer.StepProblem` for a Stable Diffusion pipeline with a LoRA base
model.

* Policy: the reference UNet with a peft LoRA adapter on the modules ``train.lora_targets`` names (the
  config's default: the ``broad`` set at rank 8), classifier-free guidance, and the optional learned
  log-variance offset.
* Step reward: ``r(s, a) = R(decode(x0_hat(a, t_prev)), c)``, the reward of the reference model's clean
  estimate at the next state (``x0_estimate="next_state"``, one reference UNet call per action), or of the
  cheaper estimate that reuses the current state's epsilon (``"current_eps"``). At the last step
  ``x0_hat = a``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from training.card import LoraSpec
from training.rewards import Reward
from training.step.chain import run_chain
from training.step.kernel import DDIMSchedule, GaussianStep, LogVarianceOffset, draw_noise, tilted_gaussian
from training.step.policy import GaussianStepPolicy, GuidedEpsilon

ADAPTER = "default"


def add_lora(unet, spec: LoraSpec, seed: int) -> None:
    """A fresh LoRA adapter with ``spec``'s rank and targets (``B = 0``, so the policy starts at the
    reference)."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(init_lora_weights=True, **spec.lora_config_kwargs()), adapter_name=ADAPTER)


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor], adapter_name: str = ADAPTER) -> None:
    """Load a LoRA state dict into the UNet's adapter ``adapter_name``; keys that match none of its modules
    (an adapter made for another UNet or another target set) raise ``ValueError``."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(
            f"adapter '{adapter_name}' does not fit this UNet: unexpected keys such as {unexpected[0]}"
        )


@contextmanager
def adapters_disabled(unet):
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> images in [0, 1], in the latents' dtype whatever the VAE's (differentiable; wrap in
    ``torch.no_grad()`` where no gradient is needed)."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.to(latents.dtype)
    return ((images + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states for ``prompts`` ``[P, L, D]`` and for the empty prompt ``[1, L, D]``."""

    def encode(texts):
        ids = pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]

    return encode(prompts), encode([""])


class DiffusionStepProblem(nn.Module):
    def __init__(
        self,
        pipe,
        reward: Reward,
        prompts: list[str],
        num_inference_steps: int,
        eta: float,
        guidance_scale: float,
        lora_rank: int = 4,
        lora_targets: str | list[str] = "attention",
        learn_variance: str = "step",
        x0_estimate: str = "next_state",
        seed: int = 0,
    ):
        super().__init__()
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.lora_spec = LoraSpec.resolve(self.unet, lora_targets, lora_rank)
        add_lora(self.unet, self.lora_spec, seed)
        self.reward = reward
        self.prompts = list(prompts)
        prompt_embeds, uncond_embeds = encode_prompts(pipe, self.prompts)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("uncond_embeds", uncond_embeds, persistent=False)
        self.schedule = DDIMSchedule.from_scheduler(pipe.scheduler, num_inference_steps, eta)
        self.eps = GuidedEpsilon(self.unet, guidance_scale)
        channels = self.unet.config.in_channels
        log_variance = {
            "none": None,
            "step": LogVarianceOffset(num_inference_steps),
            "step_channel": LogVarianceOffset(num_inference_steps, channels),
        }[learn_variance]
        self.policy = GaussianStepPolicy(self.eps, self.schedule, log_variance)
        self.reference_policy = GaussianStepPolicy(self.eps, self.schedule, None)
        self.x0_estimate = x0_estimate
        self.latent_shape = (channels, self.unet.config.sample_size, self.unet.config.sample_size)

    @classmethod
    def from_config(cls, pipe, reward: Reward, config, **overrides) -> DiffusionStepProblem:
        """The problem a :class:`~configs.schema.PipelineConfig` describes: its prompts (the digit prompts by
        default), sampling settings and trainer settings; ``overrides`` replace any keyword argument."""
        from training.reference.digits import default_prompts

        train = config.train
        settings = {
            "lora_rank": train.lora_rank,
            "lora_targets": train.lora_targets,
            "learn_variance": train.learn_variance,
            "x0_estimate": train.x0_estimate,
            "seed": train.seed,
            **overrides,
        }
        sampling = config.sampling
        return cls(
            pipe,
            reward,
            train.prompts or default_prompts(),
            sampling.num_inference_steps,
            sampling.eta,
            sampling.guidance_scale,
            **settings,
        )

    # -- StepProblem -------------------------------------------------------------------------------------
    @property
    def unet_evaluations(self) -> int:
        return self.eps.rows

    @unet_evaluations.setter
    def unet_evaluations(self, value: int) -> None:
        self.eps.rows = value

    def count_reward_gradient(self, states: int, step: int) -> None:
        if self.x0_estimate != "current_eps" and step < len(self.schedule) - 1:
            self.eps.count_backward(states)  # the clean estimate's UNet call is differentiated
        # current_eps (and the last step): x0_hat is affine in the action, the gradient skips the UNet

    def make_cond(self, prompt_index: torch.Tensor) -> dict:
        return {
            "embeds": self.prompt_embeds[prompt_index],
            "uncond": self.uncond_embeds.expand(len(prompt_index), -1, -1),
            "prompts": [self.prompts[i] for i in prompt_index.tolist()],
        }

    def initial_states(self, batch_size: int, generator: torch.Generator):
        index = torch.randint(0, len(self.prompts), (batch_size,), generator=generator)
        noise = draw_noise((batch_size, *self.latent_shape), generator, device=self.prompt_embeds.device)
        return noise, self.make_cond(index)

    def reference(self, x_t, step, cond) -> GaussianStep:
        with adapters_disabled(self.unet):
            return self.reference_policy(x_t, step, cond)

    def reference_eps(self, x_t, step, cond) -> torch.Tensor:
        """The reference model's (guided) epsilon at the states ``x_t`` of ``step``."""
        with adapters_disabled(self.unet):
            return self.eps(x_t, self.schedule.timestep(step, x_t), cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    def clean_estimate(self, x_t, actions, step, cond) -> torch.Tensor:
        """``x0_hat(a, t_prev)`` for actions ``[N, B, ...]`` -> ``[N * B, ...]``."""
        n, b = actions.shape[:2]
        flat = actions.reshape(n * b, *actions.shape[2:])
        if step == len(self.schedule) - 1:
            return flat
        if self.x0_estimate == "current_eps":
            eps = self.reference_eps(x_t, step, cond)
            return self.schedule.clean_estimate(flat, eps.repeat(n, 1, 1, 1), step, after=True)
        repeated = {k: (v.repeat(n, 1, 1) if torch.is_tensor(v) else v * n) for k, v in cond.items()}
        with adapters_disabled(self.unet):
            eps = self.eps(flat, self.schedule.timestep(step + 1, flat), repeated)
        return self.schedule.clean_estimate(flat, eps, step, after=True)

    def step_reward(self, x_t, actions, step, cond):
        n, b = actions.shape[:2]
        clean = self.clean_estimate(x_t, actions, step, cond)
        return self.reward.score(clean, cond["prompts"] * n, self.decode).view(n, b)

    @torch.no_grad()
    def quadratic_optimum(self, x_t, step: int, cond, beta: float, quadratic=None) -> GaussianStep:
        """The exact step-level optimum ``pi* ∝ p_ref exp(r / beta)`` for a :class:`LatentQuadratic` reward
        ``r(z) = -c/2 |z - z_c|^2`` under the ``current_eps`` clean estimate (docs/design.md §2.8).

        There ``x0_hat(a) = (a - sqrt(1 - a_p) eps) / sqrt(a_p)`` is affine in the action (``x0_hat = a`` at
        the last step), so ``r(a) = -(c / a_p) / 2 |a - a_c|^2`` with ``a_c = sqrt(a_p) z_c + sqrt(1 - a_p)
        eps``, and with ``k = c / (a_p beta)``

            var* = 1 / (1 / sigma_t^2 + k),    mu* = var* (mu_ref / sigma_t^2 + k a_c).

        ``quadratic``: another :class:`~training.rewards.LatentQuadratic` than the problem's reward's."""
        quadratic = quadratic or self.reward.quadratic
        if quadratic is None or self.x0_estimate != "current_eps":
            raise ValueError("the exact optimum needs a latent quadratic reward and x0_estimate current_eps")
        eps = self.reference_eps(x_t, step, cond)
        reference = self.schedule.kernel(x_t, eps, step)  # the reference kernel, from the same UNet call
        center = quadratic.center(cond["prompts"]).to(x_t)
        if step == len(self.schedule) - 1:
            alpha_prev, target = torch.ones((), dtype=x_t.dtype), center
        else:
            alpha_prev = self.schedule.alpha_prev[step].to(x_t)
            target = alpha_prev.sqrt() * center + (1 - alpha_prev).sqrt() * eps
        return tilted_gaussian(reference, target, quadratic.curvature / (alpha_prev * beta))

    def exact_step_optimum(self, x_t, step: int, cond, beta: float) -> GaussianStep | None:
        """:meth:`quadratic_optimum` where it is exact (a latent quadratic reward, ``current_eps``); else
        ``None``."""
        if self.reward.quadratic is None or self.x0_estimate != "current_eps":
            return None
        return self.quadratic_optimum(x_t, step, cond, beta)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v for k, v in lora_state_dict(self.unet).items()}
        if self.policy.log_variance is not None:
            state["log_variance"] = self.policy.log_variance.values.detach().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state_dict(self.unet, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        if self.policy.log_variance is not None and "log_variance" in state:
            with torch.no_grad():
                self.policy.log_variance.values.copy_(state["log_variance"])

    # -- sampling for evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(
        self,
        prompt_index: torch.Tensor,
        generator: torch.Generator,
        use_policy: bool = True,
        batch_size: int = 128,
    ) -> tuple[torch.Tensor, list[str], float]:
        """Full DDIM chains of the policy (or the reference); returns the final latents, the prompts and the
        mean per-step KL(policy || reference)."""
        images, prompts, kls = [], [], []

        def policy_kernel(cond):
            def kernel(x, step):
                policy = self.policy(x, step, cond)
                kls.append(policy.kl(self.reference(x, step, cond)).mean().item())
                return policy

            return kernel

        for start in range(0, len(prompt_index), batch_size):
            index = prompt_index[start : start + batch_size]
            cond = self.make_cond(index)
            x_T = draw_noise((len(index), *self.latent_shape), generator, device=self.prompt_embeds.device)
            kernel = (
                policy_kernel(cond)
                if use_policy
                else (lambda x, step, cond=cond: self.reference(x, step, cond))
            )
            images.append(run_chain(self.schedule, x_T, kernel, generator, diagnose=False).latents)
            prompts.extend(cond["prompts"])
        return torch.cat(images), prompts, (sum(kls) / len(kls) if kls else 0.0)
