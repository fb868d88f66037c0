"""Typed, pydantic-validated configuration.

Every YAML file in ``configs/`` validates against :class:`PipelineConfig`. Unknown fields are errors, and
every error names the offending field and the file it came from (:class:`ConfigError`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from configs.errors import TOO_DEEP, ConfigError, first_line
from configs.overrides import apply_overrides, source_of

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
MAX_PROMPT_CHARS = 2000
"""The longest prompt taken (config, ``--prompt``, ``--prompts-file``), checked before any model loads. The
text encoders read at most 77 tokens (CLIP; the embedded model: ``max_prompt_tokens``) and truncate the rest;
a far longer prompt only costs time and breaks the image grid's captions (PIL: "too many characters")."""

Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_RESNET = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
_TRANSFORMER = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LORA_TARGET_SETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,  # the attention projections only
    "attention_resnet": _ATTENTION + _RESNET,  # plus the ResNet blocks' convolutions and time projections
    "broad": _ATTENTION + _RESNET + _TRANSFORMER + ("conv_in", "conv_out"),  # plus feed-forward, in and out
}
"""Named LoRA target sets (``train.lora_targets``): module-name suffixes in peft's ``target_modules`` sense
(a module is adapted when its name is a target or ends with ``.<target>``). docs/design.md §5.8 gives the
fit each set reaches (``benchmarks/step_optimality.py --fit-ceiling``)."""


_ModuleName = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddedModelConfig(_Strict):
    """Architecture of the tiny Stable-Diffusion-format model pretrained here on scikit-learn's digits."""

    image_size: Annotated[int, Field(ge=8, multiple_of=8)] = 16
    latent_channels: Annotated[int, Field(ge=1)] = 4
    vae_channels: tuple[int, ...] = (16, 32)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: Annotated[int, Field(ge=1)] = 1
    attention_head_dim: Annotated[int, Field(ge=1)] = 8
    norm_num_groups: Annotated[int, Field(ge=1)] = 8
    text_hidden_size: Annotated[int, Field(ge=8)] = 32
    text_layers: Annotated[int, Field(ge=1)] = 2
    text_heads: Annotated[int, Field(ge=1)] = 4
    max_prompt_tokens: Annotated[int, Field(ge=8)] = 16
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: Annotated[float, Field(gt=0)] = 0.00085
    beta_end: Annotated[float, Field(gt=0, lt=1)] = 0.012
    num_train_timesteps: Annotated[int, Field(ge=10)] = 1000

    @model_validator(mode="after")
    def _check_channels(self) -> EmbeddedModelConfig:
        for name in ("vae_channels", "unet_channels"):
            channels = getattr(self, name)
            if not channels or any(c % self.norm_num_groups for c in channels):
                raise ValueError(
                    f"{name} must be non-empty multiples of norm_num_groups={self.norm_num_groups}"
                )
        if self.image_size % 2 ** (len(self.vae_channels) - 1):
            raise ValueError("image_size must be divisible by the VAE's downsampling factor")
        if self.text_hidden_size % self.text_heads:
            raise ValueError(
                f"text_hidden_size={self.text_hidden_size} must be a multiple of text_heads={self.text_heads}"
            )
        return self


class PretrainConfig(_Strict):
    """How the embedded reference model and its digit classifier are trained."""

    seed: int = 0
    vae_steps: Annotated[int, Field(ge=1)] = 600
    vae_lr: Annotated[float, Field(gt=0)] = 2e-3
    vae_kl_weight: Annotated[float, Field(ge=0)] = 1e-6
    unet_steps: Annotated[int, Field(ge=1)] = 1500
    unet_lr: Annotated[float, Field(gt=0)] = 2e-3
    batch_size: Annotated[int, Field(ge=1)] = 64
    uncond_prob: Annotated[float, Field(ge=0, le=1)] = 0.1
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.995
    classifier_steps: Annotated[int, Field(ge=1)] = 1500
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    eval_samples: Annotated[int, Field(ge=10)] = 500


class SamplingConfig(_Strict):
    """DDIM sampling: with ``eta > 0`` every reverse step is a Gaussian policy."""

    num_inference_steps: Annotated[int, Field(ge=1)] = 20
    eta: Annotated[float, Field(ge=0)] = 1.0
    guidance_scale: Annotated[float, Field(ge=0)] = 1.0


class ModelConfig(_Strict):
    """The frozen reference model: the embedded tiny model, or a diffusers SD checkpoint (local dir or hub
    id)."""

    source: Literal["embedded", "pretrained"] = "embedded"
    pretrained: str | None = None
    revision: str | None = None
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()

    @model_validator(mode="after")
    def _check_source(self) -> ModelConfig:
        if self.source == "pretrained" and not self.pretrained:
            raise ValueError("source 'pretrained' needs `pretrained`: a local directory or a hub id")
        return self


class TrainConfig(_Strict):
    """The step-level trainer (docs/design.md §1.5) and its evaluation."""

    method: Literal["target_matching", "policy_gradient"] = "target_matching"
    beta: Annotated[float, Field(gt=0)] = 0.01
    iterations: Annotated[int, Field(ge=1)] = 120
    """Trainer iterations. 120: on the embedded default pair the held-out kernel check (``eval_every``)
    stopped improving there; 80 more (the old 200) kept the same weights (docs/design.md §5.10)."""
    batch_size: Annotated[int, Field(ge=1)] = 32
    states_per_trajectory: Annotated[int, Field(ge=1)] = 4
    num_actions: Annotated[int, Field(ge=2)] = 8
    antithetic: bool = False
    """Draw the ``num_actions`` actions in antithetic pairs ``mean ± std * z`` (``num_actions`` even): the
    sample-mean noise of the target-matching target cancels exactly (docs/design.md §1.5)."""
    gradient_proposal: Annotated[float, Field(ge=0)] = 0.0
    """Target matching only, for differentiable rewards: draw the actions from the reference shifted by this
    share ``kappa`` of the linearised optimum's drift, ``sigma_t^2 grad r / beta``, and weight them by
    ``exp(r / beta) p_ref / q``. The target is unchanged; where the reward is near-linear on the scale of a
    step its noise shrinks (exact for a linear reward with antithetic pairs at ``kappa = 1``). Costs one
    reward gradient per state. 0: off (docs/design.md §1.5)."""
    curvature_proposal: bool = False
    """With ``gradient_proposal``: also measure the reward's curvature ``h`` along one random direction per
    state (a second difference, three more step rewards) and narrow the proposal to the Laplace step
    ``N(mu_ref + kappa v g / beta, v)``, ``v = 1 / (1 / sigma_t^2 + h / beta)``. For a reward quadratic in
    the action (a latent quadratic with ``x0_estimate: current_eps``) that is ``pi*`` itself at
    ``kappa = 1``: uniform weights, an exact target (docs/design.md §1.5)."""
    target_loss: Literal["likelihood", "regression"] = "likelihood"
    """Target matching only: how the policy is fitted to the weighted actions. ``likelihood``: their
    weighted log-likelihood, whose mean gradient scales with ``1 / sigma_theta^2`` (the learned variance);
    ``regression``: the mean regressed onto their weighted mean with weight ``1 / sigma_t^2`` (the path KL's),
    the variance fitted by the likelihood with the mean held fixed (docs/design.md §1.5)."""
    states: Literal["rollouts", "reference_pool", "mixed"] = "mixed"
    """Where the trained states come from. ``rollouts``: each iteration rolls out the current policy from
    fresh noise. ``reference_pool``: a fixed pool of ``pool_batches`` batches of reference chains, drawn
    once when training starts (seeded apart from the rollouts, so a resumed run rebuilds it exactly); each
    iteration takes one batch and its ``states_per_trajectory`` random steps. ``mixed``: the two in turn
    (rollouts at even iterations, the pool at odd ones), so the fit covers the reference's states and the
    policy's own: the default, the closest to the fit ceiling and the cheapest (docs/design.md §5.9). The
    step optimum does not depend on the policy (docs/design.md §1.3), so either set of states has the same
    target."""
    pool_batches: Annotated[int, Field(ge=1)] = 16
    """``states: reference_pool`` or ``mixed``: batches of ``batch_size`` reference chains in the pool (every
    step of each is kept: ``pool_batches * batch_size * num_inference_steps`` states)."""
    learning_rate: Annotated[float, Field(gt=0)] = 3e-3
    learning_rate_schedule: Literal["constant", "cosine"] = "constant"
    """``cosine``: the learning rate at iteration ``i`` of ``n`` is ``lr (1 + cos(pi i / n)) / 2``, from
    ``lr`` to 0 (both parameter groups); ``constant``: ``lr`` throughout."""
    variance_lr_scale: Annotated[float, Field(gt=0)] = 10.0
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    checkpoint_every: Annotated[int, Field(ge=0)] = 10
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    lora_rank: Annotated[int, Field(ge=1)] = 8
    lora_targets: str | Annotated[list[_ModuleName], Field(min_length=1)] = "broad"
    """What the LoRA adapts: a :data:`LORA_TARGET_SETS` name or a list of module names (peft
    ``target_modules``; checked against the UNet when training starts). The default, ``broad`` at rank 8, is
    the only set whose fit ceiling reaches the exact step optimum within 0.25 (docs/design.md §5.8)."""
    learn_variance: Literal["none", "step", "step_channel"] = "step"
    x0_estimate: Literal["next_state", "current_eps"] = "next_state"
    """The clean estimate the step reward scores (docs/design.md §1.4). ``next_state`` (the default): from the
    reference's epsilon at each action, one UNet row per action. ``current_eps``: from the reference's epsilon
    at the current state, no UNet row per action (28% less training time on the default pair), but its step
    reward varies so steeply at the noisiest steps that the optimum there sits in the reference's tail
    (docs/design.md §5.6, §5.9); exact for latent quadratics (configs/quadratic.yaml)."""
    eval_samples: Annotated[int, Field(ge=2)] = 256
    eval_seed: int = 1234
    eval_every: Annotated[int, Field(ge=0)] = 20
    """Iterations between held-out kernel checks (and after the last one); 0: none. Each check measures the
    policy's path error and cosine against the step optimum at ``kernel_check_chains`` fixed reference chains
    (``training.step.kernel_check``). They are logged (``kernel_error``, ``kernel_cosine``), and the weights
    saved are those of the checked iteration with the lowest error."""
    kernel_check_chains: Annotated[int, Field(ge=1)] = 8
    kernel_check_actions: Annotated[int, Field(ge=4, multiple_of=4)] = 64
    """Reference actions per held-out state for a Monte-Carlo optimum (an exact one needs none): in
    antithetic pairs, split into two halves for the noise correction."""
    max_kernel_error: Annotated[float, Field(gt=0)] = 1.0
    """The ``champion`` alias's bound on the kept weights' kernel error (flows/registry.py
    ``champion_verdict``). 1.0: closer to the step optimum than the reference itself."""
    prompts: list[Prompt] | None = None
    """Training and evaluation prompts (each at most :data:`MAX_PROMPT_CHARS` characters); ``None`` uses the
    digit prompts of the embedded default."""

    @field_validator("lora_targets")
    @classmethod
    def _known_target_set(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in LORA_TARGET_SETS:
            sets = ", ".join(LORA_TARGET_SETS)
            raise ValueError(
                f"unknown LoRA target set {value!r}: the sets are {sets}, or a list of module names"
            )
        return value

    @model_validator(mode="after")
    def _check_antithetic(self) -> TrainConfig:
        if self.antithetic and self.num_actions % 2:
            raise ValueError(
                f"antithetic pairs need an even num_actions, got {self.num_actions} "
                "(or set antithetic: false)"
            )
        if self.target_loss != "likelihood" and self.method != "target_matching":
            raise ValueError("target_loss is an option of method target_matching")
        if self.gradient_proposal and self.method != "target_matching":
            raise ValueError("gradient_proposal is an option of method target_matching")
        if self.curvature_proposal and not self.gradient_proposal:
            raise ValueError("curvature_proposal refines gradient_proposal; set gradient_proposal > 0")
        return self


class ObjectiveSpec(_Strict):
    name: str
    beta: Annotated[float, Field(gt=0)] | None = None
    """Overrides ``train.beta`` for this objective."""
    scale: Annotated[float, Field(gt=0)] = 1.0
    """The objective's reward is trained and combined as ``R / scale`` (recorded on the base-model card):
    puts objectives on a common scale, so that one beta is a moderate tilt for each (docs/design.md §1.6;
    ``benchmarks/step_optimality.py --profile`` measures the tilt)."""
    options: dict[str, object] = {}
    train: dict[str, object] = {}
    """Overrides of ``train`` settings for this objective's base model only (for example
    ``{gradient_proposal: 1.0}`` for a near-linear reward), checked as the ``train`` section is."""

    @field_validator("train")
    @classmethod
    def _known_train_fields(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown train field {unknown[0]}")
        return value


class CompositionConfig(_Strict):
    """Denoising-time composition (``msdda compose``) and the weight sweep (``msdda sweep``)."""

    methods: list[str] | None = None
    """Methods the sweep runs; ``None``: every registered method (``composition.methods.METHODS``)."""
    grid: Annotated[int, Field(ge=2)] = 11
    """Points per simplex edge: 11 gives w = 0, 0.1, ..., 1 for two objectives."""
    num_images: Annotated[int, Field(ge=2)] = 128
    """Images per method and weight vector (prompts cycle through the prompt set)."""
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1)] = 128
    code_candidates: Annotated[int, Field(ge=1)] = 2
    """CoDe's N; with 2 objectives N = 2 matches MSDDA's UNet rows per step."""
    code_block: Annotated[int, Field(ge=1)] = 5
    """CoDe's B: steps between selections."""
    rgg_scale: Annotated[float, Field(ge=0)] = 1.0
    """RGG's lambda_t (constant over steps)."""
    beta: Annotated[float, Field(gt=0)] | None = None
    """The target's KL coefficient: ``lam_i = w_i beta_i / beta`` for MSDDA, the epsilon blend and the soup,
    and RGG's score ``sum_i w_i r_i / beta`` (docs/design.md §2.3). ``None``: the base models' common beta
    (``lam = w``). A smaller target extrapolates the drifts, a larger one shrinks them: a curve per method
    with no retraining. Required when the base models' betas differ."""
    path_kl: bool = False
    """Measure each image's path KL from the reference and the regularised objective ``J_w`` (docs/design.md
    §4.5): one extra, uncounted reference UNet row per step for MSDDA, the blend and the soup."""
    compile: bool = False
    """``torch.compile`` the UNet forward of the composed step (``composition.batched.compile_unet``: CUDA
    graphs on a GPU), removing most of the kernel-launch overhead of small batches; the first call compiles
    (tens of seconds to minutes). Same outputs up to float rounding; not part of the sweep's cache key."""

    routed_weights: Literal["merged", "lora"] = "merged"
    """How the routed UNet call computes each adapted layer (``composition.batched``): ``merged``, each base
    model's merged weight ``W + s B A`` (the plain layer's work; K copies of the adapted weights in memory),
    or ``lora``, the base output plus the low-rank deltas (no extra weights, more activation traffic)."""
    plan: Literal["auto", "one_call", "per_model"] = "auto"
    """How a composed step runs its K UNet evaluations: one routed call of ``K * B`` rows, or K calls of ``B``
    rows each. ``auto``: K calls on the CPU (faster there, docs/performance.md), one call on a GPU. Same
    outputs up to float rounding; neither this nor ``routed_weights`` is part of the sweep's cache key."""


Device = Literal["auto", "cpu", "cuda"]
"""Where the models run (``runtime.device``, ``--device``)."""


class RuntimeConfig(_Strict):
    """Where every stage runs (pretraining, training, rewards, composition, the sweep). Not part of any
    cache key: a base model trained on a GPU is the same model."""

    device: Device = "auto"
    """``auto``: CUDA when there is one, else the CPU. ``cuda`` where there is none is a one-line error."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """The frozen reference model's weights for sampling and composition (trainable weights stay fp32)."""
    num_threads: Annotated[int, Field(ge=0)] = 0
    """Torch intra-op threads on the CPU; 0: ``OMP_NUM_THREADS`` when set, else one per CPU this process may
    use (``training.device.configure_threads``; docs/operations.md measures what helps under load)."""


class PipelineConfig(_Strict):
    model: ModelConfig = ModelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    composition: CompositionConfig = CompositionConfig()
    objectives: list[ObjectiveSpec] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: object) -> object:
        """``pretrain.num_threads``, from before ``runtime.num_threads`` existed, sets the latter."""
        if (
            isinstance(data, dict)
            and isinstance(data.get("pretrain"), dict)
            and "num_threads" in data["pretrain"]
        ):
            pretrain = dict(data["pretrain"])
            runtime = dict(data.get("runtime") or {})
            runtime.setdefault("num_threads", pretrain.pop("num_threads"))
            data = {**data, "pretrain": pretrain, "runtime": runtime}
        return data

    @field_validator("objectives", mode="before")
    @classmethod
    def _names_to_specs(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @property
    def objective_names(self) -> list[str]:
        return [spec.name for spec in self.objectives]

    def objective(self, name: str) -> ObjectiveSpec:
        """The spec for ``name`` (a bare spec if the config does not list it)."""
        return next((spec for spec in self.objectives if spec.name == name), ObjectiveSpec(name=name))

    def train_for(self, name: str) -> TrainConfig:
        """The ``train`` section with objective ``name``'s own overrides applied."""
        overrides = self.objective(name).train
        if not overrides:
            return self.train
        try:
            return TrainConfig.model_validate({**self.train.model_dump(), **overrides})
        except ValidationError as exc:
            error = exc.errors()[0]
            located = {**error, "loc": ("train", *error["loc"])}
            raise ValueError(_format_error(located, f"objective {name}")) from None

    def for_objective(self, name: str) -> PipelineConfig:
        """This config with :meth:`train_for` as its ``train`` section: what ``name``'s base model is
        trained (and keyed) with."""
        train = self.train_for(name)
        return self if train is self.train else self.model_copy(update={"train": train})

    @model_validator(mode="after")
    def _check_objective_train(self) -> PipelineConfig:
        for spec in self.objectives:
            self.train_for(spec.name)
        return self


def _format_error(error: dict, source: str) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{source}: {field}: {message}"


def parse_config(data: object, source: str = "<config>", overrides: Sequence[str] = ()) -> PipelineConfig:
    """Validate a mapping with ``overrides`` (``section.field=value``, :mod:`configs.overrides`) applied on
    top; raise :class:`ConfigError` naming the first bad field and where it was set: ``source``, or the
    ``--set`` that set it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        data = apply_overrides(data, overrides) if overrides else data
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(_format_error(error, source_of(error["loc"], overrides, source))) from None
    except RecursionError:
        raise ConfigError(f"{source}: {TOO_DEEP}") from None


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load and validate a YAML config, with ``overrides`` (``section.field=value``) applied on top; ``None``
    loads ``configs/default.yaml``."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); a config is YAML text"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:  # PyYAML reads nested collections recursively: a few hundred levels exhaust Python
        raise ConfigError(f"{path}: {TOO_DEEP}") from None
    return parse_config(data, str(path), overrides)
