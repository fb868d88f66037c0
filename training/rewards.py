"""Image rewards: a registry of ``R(images, prompts) -> [N]`` with images ``[N, 3, H, W]`` in [0, 1].

Each reward declares whether it is differentiable (RGG and gradient-based baselines need that). The offline
rewards run on the embedded default; the heavy ones (ImageReward, LAION aesthetic, PickScore, CLIP score,
HPSv2) are plugins that import lazily and load their weights from ``options.weights`` (a local path or a hub
id); without them they fail with one line.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from configs.errors import MsddaError, first_line
from training.images import to_uint8
from training.reference.digits import DIGIT_WORDS


class RewardError(MsddaError, ValueError):
    """An unknown objective, or a reward whose weights or package are missing (one-line message)."""


@dataclass(frozen=True)
class LatentQuadratic:
    """``r(z) = -curvature / 2 * |z - center(prompts)|^2`` (summed over the latent's elements): a reward that
    is exactly quadratic in the clean latent ``z``. With the ``current_eps`` clean estimate, which is affine
    in the action, its step-level optimum is exactly Gaussian (:meth:`DiffusionStepProblem.quadratic_optimum`,
    docs/design.md §2.8)."""

    curvature: float
    center: Callable[[list[str]], torch.Tensor]
    """prompts -> ``[N, C, H, W]`` centres"""

    def __call__(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        target = self.center(prompts).to(latents)
        return -self.curvature / 2 * ((latents - target) ** 2).flatten(1).sum(1)

    def scaled(self, factor: float) -> LatentQuadratic:
        return LatentQuadratic(self.curvature * factor, self.center)


def combine_quadratics(parts: list[tuple[LatentQuadratic, float]]) -> LatentQuadratic:
    """``sum_i w_i r_i`` of quadratics is one quadratic (up to a constant): curvature ``C = sum_i w_i c_i``
    and centre ``sum_i w_i c_i z_i / C``."""
    total = sum(w * q.curvature for q, w in parts)
    if total <= 0:
        raise RewardError("a weighted sum of latent quadratic rewards needs a positive total curvature")

    def center(prompts: list[str]) -> torch.Tensor:
        return sum(w * q.curvature * q.center(prompts) for q, w in parts) / total

    return LatentQuadratic(total, center)


@dataclass
class Reward:
    """A named reward. ``fn(images, prompts) -> [N]`` (higher is better), on the images' device: a
    reward's models, tokens and buffers follow the images (``runtime.device``). A latent reward
    (``on_latents``) takes the clean latents instead of the decoded images (use :meth:`score`)."""

    name: str
    differentiable: bool
    fn: Callable[[torch.Tensor, list[str]], torch.Tensor]
    _: KW_ONLY
    description: str = ""
    info: dict = field(default_factory=dict)
    on_latents: bool = False
    quadratic: LatentQuadratic | None = None
    """Set when the reward is exactly a :class:`LatentQuadratic` (then ``on_latents``)."""

    def __call__(self, inputs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.differentiable:
            return self.fn(inputs, prompts).to(inputs.device)
        with torch.no_grad():
            return self.fn(inputs, prompts).to(inputs.device)

    def score(
        self, latents: torch.Tensor, prompts: list[str], decode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The reward of clean ``latents``: on the latents themselves, or on ``decode(latents)``."""
        return self(latents if self.on_latents else decode(latents), prompts)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` of per-image rewards (or of paired differences)."""
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# ------------------------------------------------------------------------------------------ offline rewards


def prompted_digit(prompt: str) -> int:
    """The digit a prompt names ("a handwritten digit seven" -> 7)."""
    for word in prompt.lower().replace(",", " ").split():
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    raise RewardError(f"digit_alignment needs a prompt that names a digit, got {prompt!r}")


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images


def ink_economy(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``-mean(pixel intensity)``: less ink is better (differentiable)."""
    return -_grayscale(images).flatten(1).mean(1)


def symmetry(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``-mean |x - mirror(x)|`` over the left-right mirror (differentiable)."""
    gray = _grayscale(images)
    return -(gray - gray.flip(-1)).abs().flatten(1).mean(1)


def jpeg_compressibility(images: torch.Tensor, prompts: list[str], quality: int = 95) -> torch.Tensor:
    """``-(JPEG size in kB)`` at ``quality`` (not differentiable)."""
    from PIL import Image

    pixels = to_uint8(images)
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32, device=images.device)


def digit_alignment(config, home: Path, options: dict) -> Reward:
    """``log p(prompted digit | image)`` under the cached digit CNN (differentiable)."""
    from training.reference.classifier import to_grayscale
    from training.reference.embedded import digit_classifier

    classifier, report = digit_classifier(config, home, progress=False)
    classifier.requires_grad_(False)
    size = config.model.embedded.image_size

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = torch.tensor([prompted_digit(p) for p in prompts], device=images.device)
        logits = classifier.to(images.device)(
            to_grayscale(images, size)
        )  # the reward follows the images' device
        return logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)

    return Reward(
        "digit_alignment",
        True,
        fn,
        description="log-probability of the prompted digit under a small CNN",
        info={"classifier_test_accuracy": report.test_accuracy},
    )


def prototype_match(config, home: Path, options: dict) -> Reward:
    """``-sharpness / 2 * |gray(image) - prototype_d|^2`` (summed over pixels): the log-density, up to a
    constant, of a Gaussian image model with precision ``sharpness`` around the mean training image of the
    prompted digit ``d`` (differentiable).

    Unlike the near-linear ``ink_economy``, this reward bends on the scale of one denoising step: its step
    optimum ``p_ref exp(r / beta)`` is narrower than the reference kernel, so a base model must learn a
    variance, not only a mean (docs/design.md §2.8). ``options.sharpness`` (default 1.0) sets how much.
    """
    from training.reference.digits import train_test_split

    sharpness = _sharpness("prototype_match", options, default=1.0)
    size = config.model.embedded.image_size
    train, _ = train_test_split(size, config.pretrain.test_fraction, seed=0)  # the pretraining split
    prototypes = torch.stack([train.images[train.labels == d].mean(0) for d in range(10)])  # [10, 1, S, S]

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from training.reference.classifier import to_grayscale

        labels = torch.tensor([prompted_digit(p) for p in prompts], device=images.device)
        target = prototypes.to(images)[labels]
        return -sharpness / 2 * ((to_grayscale(images, size) - target) ** 2).flatten(1).sum(1)

    return Reward(
        "prototype_match",
        True,
        fn,
        description="closeness to the prompted digit's mean training image (a curved reward)",
        info={"sharpness": sharpness},
    )


def _clean_latents(config, home: Path):
    """The reference VAE's posterior-mean latents (times its scaling factor) of the pretraining split's
    images, with their labels, and the latent of the blank (ink-free) image."""
    from training.reference.digits import train_test_split
    from training.reference.embedded import _to_vae_input
    from training.reference.loader import load_reference_pipeline

    if config.model.source != "embedded":
        raise RewardError("the latent digit rewards need the embedded model (they use its digit images)")
    vae = load_reference_pipeline(config, home, progress=False).vae
    size = config.model.embedded.image_size
    train, _ = train_test_split(size, config.pretrain.test_fraction, seed=0)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        latents = vae.encode(_to_vae_input(images).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).float().cpu()

    latents = torch.cat([encode(chunk) for chunk in train.images.split(256)])
    return latents, train.labels, encode(torch.zeros_like(train.images[:1]))[0]


def _sharpness(name: str, options: dict, default: float) -> float:
    """``options.sharpness`` (``default`` when absent), refused in one line unless a positive number."""
    sharpness = float(options.get("sharpness", default))
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise RewardError(f"{name}: options.sharpness must be a positive number, got {sharpness}")
    return sharpness


def _latent_reward(name: str, quadratic: LatentQuadratic, description: str) -> Reward:
    return Reward(
        name,
        True,
        quadratic,
        description=description,
        info={"sharpness": quadratic.curvature},
        on_latents=True,
        quadratic=quadratic,
    )


def latent_prototype(config, home: Path, options: dict) -> Reward:
    """``-sharpness / 2 * |z - z_d|^2``: closeness of the clean latent ``z`` to the prompted digit ``d``'s
    mean training latent ``z_d`` (a latent reward, exactly quadratic: its step optimum is an exact Gaussian
    narrower than the reference kernel, docs/design.md §2.8). ``options.sharpness`` (default 0.003)."""
    sharpness = _sharpness("latent_prototype", options, 0.003)
    latents, labels, _ = _clean_latents(config, home)
    prototypes = torch.stack([latents[labels == d].mean(0) for d in range(10)])

    def center(prompts: list[str]) -> torch.Tensor:
        return prototypes[torch.tensor([prompted_digit(p) for p in prompts])]

    return _latent_reward(
        "latent_prototype",
        LatentQuadratic(sharpness, center),
        "closeness of the clean latent to the prompted digit's mean latent (exactly quadratic)",
    )


def latent_blank(config, home: Path, options: dict) -> Reward:
    """``-sharpness / 2 * |z - z_blank|^2``: closeness of the clean latent to the blank image's latent, a
    quadratic ink economy in latent space (exactly quadratic, docs/design.md §2.8). ``options.sharpness``
    (default 0.03)."""
    sharpness = _sharpness("latent_blank", options, 0.03)
    _, _, blank = _clean_latents(config, home)

    def center(prompts: list[str]) -> torch.Tensor:
        return blank.expand(len(prompts), *blank.shape)

    return _latent_reward(
        "latent_blank",
        LatentQuadratic(sharpness, center),
        "closeness of the clean latent to the blank image's latent (exactly quadratic)",
    )


# ---------------------------------------------------------------------------------------- heavy (plugins)


def _weights(name: str, options: dict) -> str:
    source = options.get("weights")
    if not source:
        raise RewardError(f"reward '{name}' needs `options.weights`: a local path or a hub id of its weights")
    if Path(os.path.expanduser(source)).exists():
        return os.path.expanduser(source)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise RewardError(f"reward '{name}': weights not found at {source}")
    return source


def _import(name: str, module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RewardError(f"reward '{name}' needs the package '{package}' (pip install {package})") from None


def _load_or_fail(name: str, source: str, loader: Callable):
    from safetensors import SafetensorError

    try:
        return loader(source)
    except (OSError, ValueError, SafetensorError) as exc:
        raise RewardError(f"reward '{name}': cannot load weights '{source}': {first_line(exc)}") from None


def _clip_scorer(name: str, options: dict, head: Callable | None = None) -> Reward:
    """CLIP-family rewards: cosine similarity of image and prompt embeddings (optionally through a head)."""
    source = _weights(name, options)
    transformers = _import(name, "transformers", "transformers")
    model = _load_or_fail(name, source, lambda s: transformers.CLIPModel.from_pretrained(s).eval())
    processor = _load_or_fail(
        name, options.get("processor", source), transformers.CLIPProcessor.from_pretrained
    )
    scale = float(options.get("scale", 100.0 if name == "pickscore" else 1.0))

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        size = processor.image_processor.crop_size["height"]
        pixels = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bicubic", align_corners=False
        )
        mean = torch.tensor(processor.image_processor.image_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_processor.image_std, device=images.device).view(1, 3, 1, 1)
        model.to(images.device)  # the reward follows the images' device
        image_embeds = model.get_image_features(pixel_values=(pixels - mean) / std)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        if head is not None:
            return head(image_embeds)
        tokens = processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(
            images.device
        )
        text_embeds = model.get_text_features(**tokens)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return scale * (image_embeds * text_embeds).sum(-1)

    return Reward(name, True, fn, description=f"CLIP-family score from {source}")


def clip_score(config, home, options) -> Reward:
    return _clip_scorer("clip_score", options)


def pickscore(config, home, options) -> Reward:
    return _clip_scorer("pickscore", {"processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **options})


def laion_aesthetic(config, home, options) -> Reward:
    """LAION aesthetic predictor v2: a linear/MLP head (safetensors at ``options.head``) on CLIP ViT-L/14."""
    head_path = options.get("head")
    if not head_path or not Path(head_path).expanduser().exists():
        raise RewardError("reward 'laion_aesthetic' needs `options.head`: the predictor head as .safetensors")
    from safetensors.torch import load_file

    state = _load_or_fail("laion_aesthetic", str(Path(head_path).expanduser()), load_file)
    layers = sorted({k.rsplit(".", 1)[0] for k in state})

    def head(embeds: torch.Tensor) -> torch.Tensor:
        x = embeds
        for layer in layers:  # the head's weights follow the embeddings' device and dtype
            x = x @ state[f"{layer}.weight"].to(x).T + state[f"{layer}.bias"].to(x)
        return x.squeeze(-1)

    return _clip_scorer("laion_aesthetic", {"weights": "openai/clip-vit-large-patch14", **options}, head)


def image_reward(config, home, options) -> Reward:
    """ImageReward (Xu et al., 2023) through its own package; not differentiable through our interface."""
    source = _weights("image_reward", options)
    module = _import("image_reward", "ImageReward", "image-reward")
    model = _load_or_fail("image_reward", source, module.load)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        arrays = to_uint8(images)
        scores = [float(model.score(p, Image.fromarray(a))) for p, a in zip(prompts, arrays)]
        return torch.tensor(scores, device=images.device)

    return Reward("image_reward", False, fn, description=f"ImageReward from {source}")


def hpsv2(config, home, options) -> Reward:
    source = _weights("hpsv2", options)
    module = _import("hpsv2", "hpsv2", "hpsv2")

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        arrays = to_uint8(images)
        return torch.tensor(
            [float(module.score(Image.fromarray(a), p, cp=source)[0]) for p, a in zip(prompts, arrays)],
            device=images.device,
        )

    return Reward("hpsv2", False, fn, description=f"HPSv2 from {source}")


def _simple(name: str, fn: Callable, differentiable: bool, description: str):
    def factory(config, home, options) -> Reward:
        return Reward(name, differentiable, fn, description=description)

    factory.differentiable = differentiable
    return factory


def rescaled(reward: Reward, scale: float) -> Reward:
    """``R / scale`` (the identity for ``scale == 1``); same name and differentiability."""
    if scale == 1.0:
        return reward
    return Reward(
        reward.name,
        reward.differentiable,
        lambda inputs, prompts: reward.fn(inputs, prompts) / scale,
        description=f"{reward.description} / {scale:g}",
        info={**reward.info, "scale": scale},
        on_latents=reward.on_latents,
        quadratic=reward.quadratic.scaled(1 / scale) if reward.quadratic else None,
    )


def objective_reward(name: str, config, home: Path) -> Reward:
    """The config's objective ``name`` as it is trained and combined: its reward with its options, divided by
    its ``scale``."""
    spec = config.objective(name)
    return rescaled(load_reward(name, config, home, spec.options), spec.scale)


def weighted_sum(config, home, options) -> Reward:
    """``sum_i w_i R_i``: the combined reward the oracle is trained on. ``options.terms`` maps reward names
    to weights, e.g. ``{"digit_alignment": 0.25, "ink_economy": 0.75}``; each term is its objective's reward
    as trained (its options and scale, :func:`objective_reward`)."""
    terms = options.get("terms")
    if not isinstance(terms, dict) or not terms:
        raise RewardError("weighted_sum needs options.terms, a mapping of reward names to weights")
    parts = [(objective_reward(name, config, home), float(w)) for name, w in terms.items()]
    on_latents = {reward.on_latents for reward, _ in parts}
    if len(on_latents) > 1:
        raise RewardError("weighted_sum cannot mix latent rewards with image rewards")

    def fn(inputs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(w * reward(inputs, prompts) for reward, w in parts)

    label = " + ".join(f"{w:g} * {reward.name}" for reward, w in parts)
    quadratic = None
    if all(reward.quadratic for reward, _ in parts):
        quadratic = combine_quadratics([(reward.quadratic, w) for reward, w in parts])
    differentiable = all(r.differentiable for r, _ in parts)
    info = {"terms": dict(terms)}
    return Reward(
        "weighted_sum",
        differentiable,
        fn,
        description=label,
        info=info,
        on_latents=on_latents.pop(),
        quadratic=quadratic,
    )


REWARDS: dict[str, Callable] = {
    "digit_alignment": digit_alignment,
    "ink_economy": _simple("ink_economy", ink_economy, True, "negative mean ink"),
    "symmetry": _simple("symmetry", symmetry, True, "negative left-right asymmetry"),
    "prototype_match": prototype_match,
    "latent_prototype": latent_prototype,
    "latent_blank": latent_blank,
    "compressibility": _simple("compressibility", jpeg_compressibility, False, "negative JPEG size (kB)"),
    "clip_score": clip_score,
    "pickscore": pickscore,
    "laion_aesthetic": laion_aesthetic,
    "image_reward": image_reward,
    "hpsv2": hpsv2,
    "weighted_sum": weighted_sum,
}


RewardName = Literal[tuple(REWARDS)]  # type: ignore[valid-type]
"""A known reward's name: the choices of ``msdda train --objective``."""


def load_reward(name: str, config, home: Path, options: dict | None = None) -> Reward:
    """Build the reward ``name``; raises :class:`RewardError` (one line) if unknown or not loadable."""
    if name not in REWARDS:
        raise RewardError(f"unknown objective '{name}'; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](config, home, dict(options or {}))
