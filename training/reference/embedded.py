"""The embedded default reference: a tiny Stable-Diffusion-format model pretrained here on the shipped digits.

It has the four SD components (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` with a
``CLIPTokenizer`` built here, ``DDIMScheduler``), is saved with ``save_pretrained`` and loads through
``StableDiffusionPipeline.from_pretrained``. Building it is deterministic for a given config and seed, and the
result is cached under ``$MSDDA_HOME/reference/<key>``, where ``key`` hashes the config, the data and the
format.

A cached folder (the reference, or the evaluator CNN under ``$MSDDA_HOME/classifiers/<key>``) is complete
once its ``DONE`` file is there; ``DONE`` lists its files and their :func:`training.storage.content_hash`.
Every reuse checks them (and that each JSON file and safetensors header parses): a damaged cache is said on
stderr, removed and rebuilt. Caches from before ``DONE`` held a manifest are checked by parsing alone. Only
the content counts as damage: a file the OS cannot read now (permission denied, an I/O error) fails in one
line and nothing is removed (:func:`training.storage.raise_unless_content_fault`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from configs.errors import first_line
from configs.schema import EmbeddedModelConfig, PipelineConfig, PretrainConfig, SamplingConfig
from training.device import resolve_device
from training.reference.checkpoint import check_checkpoint
from training.reference.classifier import (
    ClassifierReport,
    load_classifier,
    save_classifier,
    to_grayscale,
    train_classifier,
)
from training.reference.digits import (
    DIGIT_WORDS,
    PROMPT_TEMPLATES,
    data_fingerprint,
    digit_prompt,
    prompt_vocabulary,
    train_test_split,
)
from training.reference.tokenizer import build_tokenizer, save_tokenizer
from training.step.kernel import draw_noise
from training.storage import (
    ModelLoadError,
    atomic_file,
    check_writable,
    content_hash,
    raise_unless_content_fault,
    staged_directory,
)

FORMAT_VERSION = 1
META_FILE = "msdda_reference.json"
DONE_FILE = "DONE"  # marks a cached folder complete; holds its manifest (see the module docstring)
CLASSIFIER_FILES = ("model.safetensors", "classifier.json")
META_KEYS = ("alignment_accuracy", "alignment_eval", "classifier_test_accuracy", "pretrain_seconds")


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    alignment_accuracy: float
    classifier_test_accuracy: float
    pretrain_seconds: float
    cached: bool
    key: str
    reference_hash: str
    """The model's :func:`training.storage.content_hash`, as base models record it."""


# ----------------------------------------------------------------------------------------------- components


def vae_scale_factor(cfg: EmbeddedModelConfig) -> int:
    return 2 ** (len(cfg.vae_channels) - 1)


def build_components(cfg: EmbeddedModelConfig) -> dict:
    """Freshly initialised SD components for ``cfg`` (call ``torch.manual_seed`` first for determinism)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(prompt_vocabulary(), cfg.max_prompt_tokens)
    levels = len(cfg.unet_channels)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden_size,
            intermediate_size=4 * cfg.text_hidden_size,
            projection_dim=cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // vae_scale_factor(cfg),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


# ------------------------------------------------------------------------------------------------- caching


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def reference_key(config: PipelineConfig) -> str:
    """Cache key: architecture, pretraining recipe (less thread count), data and format version."""
    recipe = config.pretrain.model_dump()
    return _digest(
        {
            "format": FORMAT_VERSION,
            "model": config.model.embedded.model_dump(mode="json"),
            "pretrain": recipe,
            "data": data_fingerprint(),
        }
    )


def classifier_key(size: int, pretrain: PretrainConfig) -> str:
    return _digest(
        {
            "format": FORMAT_VERSION,
            "size": size,
            "steps": pretrain.classifier_steps,
            "seed": pretrain.seed,
            "test_fraction": pretrain.test_fraction,
            "data": data_fingerprint(),
        }
    )


class CacheError(ModelLoadError):
    """What is wrong with a damaged cached folder, in one line (:func:`pretrain_reference` and
    :func:`digit_classifier` rebuild such a folder)."""


def _seal(folder: Path) -> None:
    """Mark the staged cache ``folder`` complete: its ``DONE`` manifest lists its files and content hash."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    manifest = {"files": files, "content_hash": content_hash(folder)}
    (folder / DONE_FILE).write_text(json.dumps(manifest, indent=2))


def _manifest(folder: Path) -> dict:
    """``folder``'s ``DONE`` manifest; ``{}`` for an empty ``DONE`` (a cache from before the manifest)."""
    path = folder / DONE_FILE
    try:
        text = path.read_text().strip()
        manifest = json.loads(text) if text else {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise_unless_content_fault(exc, path)
        problem = "is missing" if isinstance(exc, FileNotFoundError) else f"is unreadable ({first_line(exc)})"
        raise CacheError(f"{DONE_FILE} {problem}") from None
    files = manifest.get("files", []) if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise CacheError(f"{DONE_FILE} is not a manifest of the folder's files")
    return manifest


def _unreadable(path: Path) -> str | None:
    """Why the JSON file or safetensors file at ``path`` does not parse (headers only), or ``None``; a file
    the OS cannot read now raises :class:`ModelLoadError` (see
    :func:`training.storage.raise_unless_content_fault`)."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt"):
                pass
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as exc:
        raise_unless_content_fault(exc, path)
        return first_line(exc)
    return None


def _checked_cache(folder: Path, required: tuple[str, ...]) -> str:
    """The content hash of the cached ``folder`` once it checks out: every file its manifest lists (and
    ``required``) is there, every JSON file and safetensors header parses, and the content hash is the one
    recorded at build time. Raises :class:`CacheError` naming what is wrong, or :class:`ModelLoadError` for a
    file the OS cannot read now (that is no damage)."""
    manifest = _manifest(folder)
    for name in (*required, *manifest.get("files", [])):
        if not (folder / name).is_file():
            raise CacheError(f"{name} is missing")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        reason = _unreadable(path)
        if reason:
            raise CacheError(f"{path.relative_to(folder).as_posix()} is unreadable ({reason})")
    try:
        digest = content_hash(folder)
    except OSError as exc:  # a file gone since, or one the OS cannot read now
        path = Path(exc.filename or folder)
        raise_unless_content_fault(exc, path)
        raise CacheError(f"{path.relative_to(folder).as_posix()} is missing") from None
    if manifest.get("content_hash", digest) != digest:
        raise CacheError("its files differ from the content hash recorded when it was built")
    return digest


def _reusable_cache(folder: Path, what: str, check, how: str = "") -> str | None:
    """The content hash of the cached ``folder`` when ``check`` (raising :class:`CacheError`) trusts it;
    ``None`` when there is none, or when it is damaged: that is said on stderr (ending with ``how`` it is
    rebuilt) and the folder removed, so that the caller rebuilds it. A folder the OS cannot read is left as
    it is (``check`` raises :class:`ModelLoadError`)."""
    if not folder.exists():
        return None
    try:
        return check(folder)
    except CacheError as exc:
        problem = str(exc)
    warning = f"warning: the cached {what} at {folder} is damaged ({problem}); rebuilding it{how}"
    print(warning, file=sys.stderr)
    aside = folder.with_name(f".damaged-{folder.name}-{secrets.token_hex(4)}")
    try:
        folder.rename(aside)  # a concurrent reader sees the old folder or none, never a half-removed one
    except FileNotFoundError:
        return None  # another process moved it aside first
    except OSError as exc:
        raise ModelLoadError(
            f"the cached {what} at {folder} is damaged ({problem}) and cannot be moved aside "
            f"({first_line(exc)}): remove it, then rerun"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)
    return None


def check_classifier_cache(folder: Path) -> str:
    """The content hash of the cached evaluator CNN in ``folder``, or :class:`CacheError` (see
    :func:`_checked_cache`)."""
    return _checked_cache(folder, CLASSIFIER_FILES)


def check_reference_cache(folder: Path) -> str:
    """:func:`_checked_cache` for the reference, plus its SD components and metadata keys."""
    try:
        check_checkpoint(str(folder))
    except ModelLoadError as exc:
        raise CacheError(str(exc)) from None
    digest = _checked_cache(folder, (META_FILE,))
    meta = json.loads((folder / META_FILE).read_text())
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing or not isinstance(meta["alignment_eval"], dict):
        raise CacheError(f"{META_FILE} lacks {', '.join(missing) or 'a valid alignment_eval'}")
    return digest


def digit_classifier(config: PipelineConfig, home: Path, progress: bool = True):
    """The cached evaluator CNN for the embedded model's image size, trained on the train split (on
    ``config.runtime.device``); it loads on the CPU, and its users move it to their images' device. A damaged
    cache is retrained (see the module docstring)."""
    size = config.model.embedded.image_size
    final = home / "classifiers" / classifier_key(size, config.pretrain)
    if _reusable_cache(final, "evaluator CNN", check_classifier_cache) is None:
        check_writable(final.parent)  # before the training, not after
        train, test = train_test_split(size, config.pretrain.test_fraction, seed=0)
        model, report = train_classifier(
            train,
            test,
            config.pretrain.classifier_steps,
            config.pretrain.seed,
            progress,
            device=resolve_device(config.runtime.device),
        )
        # keep_existing: a concurrent build that won the race is kept
        with staged_directory(final, keep_existing=True) as tmp:
            save_classifier(model, report, tmp)
            _seal(tmp)
    return load_classifier(final)


# ---------------------------------------------------------------------------------------------- pretraining


def _to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """Grayscale [0, 1] -> RGB [-1, 1], the SD VAE convention."""
    return images.repeat(1, 3, 1, 1) * 2 - 1


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(
    vae, images: torch.Tensor, pretrain: PretrainConfig, generator: torch.Generator, progress: bool
):
    """Reconstruction MSE plus ``vae_kl_weight`` * KL(q(z|x) || N(0, I)), on the VAE's device (random draws
    from the CPU ``generator``, then moved); returns the posterior-mean latents on that device."""
    device = vae.device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=pretrain.vae_lr, weight_decay=0.0)
    warmup = min(100, pretrain.vae_steps // 10 + 1)
    schedule = _cosine_with_warmup(optimizer, pretrain.vae_steps, warmup=warmup)
    x_all = _to_vae_input(images.to(device))
    vae.train()
    bar = tqdm(range(pretrain.vae_steps), desc="pretrain: autoencoder", disable=not progress)
    for _ in bar:
        x = x_all[torch.randint(0, len(x_all), (pretrain.batch_size,), generator=generator).to(device)]
        posterior = vae.encode(x).latent_dist
        noise = draw_noise(posterior.mean.shape, generator, device=device)
        z = posterior.mean + posterior.std * noise
        loss = F.mse_loss(vae.decode(z).sample, x) + pretrain.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x_all.split(512)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents


def _prompt_bank(tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[10, T, L]`` for every (digit, template) pair, and ``[L]`` for the empty prompt."""

    def ids(text: str) -> torch.Tensor:
        encoded = tokenizer(
            text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return encoded["input_ids"][0]

    bank = torch.stack(
        [torch.stack([ids(digit_prompt(d, t)) for t in range(len(PROMPT_TEMPLATES))]) for d in range(10)]
    )
    return bank, ids("")


def train_denoiser(components: dict, latents, labels, pretrain: PretrainConfig, generator, progress: bool):
    """Epsilon-prediction MSE for the UNet and text encoder, with prompt dropout for classifier-free guidance.

    Runs on the UNet's device; random draws come from the CPU ``generator`` and are moved there. Returns EMA
    copies of both (decay ``ema_decay``), which is what gets saved.
    """
    unet, text_encoder, scheduler = components["unet"], components["text_encoder"], components["scheduler"]
    device = unet.device
    tokenizer = components["tokenizer"]
    bank, empty = _prompt_bank(tokenizer, tokenizer.model_max_length)
    latents = latents.to(device) * components["vae"].config.scaling_factor
    alphas_cumprod = scheduler.alphas_cumprod
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=pretrain.unet_lr, weight_decay=1e-4)
    warmup = min(200, pretrain.unet_steps // 10 + 1)
    schedule = _cosine_with_warmup(optimizer, pretrain.unet_steps, warmup=warmup)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    unet.train()
    text_encoder.train()
    n, batch = len(latents), pretrain.batch_size
    bar = tqdm(range(pretrain.unet_steps), desc="pretrain: denoiser", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=generator)
        x0 = latents[idx.to(device)]
        noise = draw_noise(x0.shape, generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1).to(device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        template = torch.randint(0, len(PROMPT_TEMPLATES), (batch,), generator=generator)
        input_ids = bank[labels[idx], template]
        drop = torch.rand(batch, generator=generator) < pretrain.uncond_prob
        input_ids = torch.where(drop[:, None], empty[None], input_ids).to(device)
        context = text_encoder(input_ids)[0]
        loss = F.mse_loss(unet(x_t, t.to(device), encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(pretrain.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema_unet, ema_text


def save_pipeline(components: dict, directory: Path) -> None:
    """Save as a standard ``StableDiffusionPipeline`` (no safety checker, as for any research checkpoint)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(components["tokenizer"], prompt_vocabulary(), directory / "tokenizer")


def load_embedded_pipeline(path: Path):
    """The saved pipeline at ``path`` (safetensors only, never pickle); an unreadable one raises
    :class:`ModelLoadError` (one line)."""
    from diffusers import StableDiffusionPipeline
    from safetensors import SafetensorError

    try:
        return StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False, use_safetensors=True
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(
            f"cannot load the embedded reference model at {path}: {first_line(exc)}; "
            f"remove the folder and rerun `msdda pretrain` to rebuild it"
        ) from None


@torch.no_grad()
def alignment_accuracy(
    pipe,
    classifier,
    sampling: SamplingConfig,
    num_samples: int,
    seed: int,
    progress: bool,
    batch_size: int = 250,
) -> float:
    """Share of ``num_samples`` DDIM samples (prompts cycling over digits and paraphrases) that the classifier
    labels as the prompted digit; runs on the pipeline's device (the classifier follows the images)."""
    digits = [i % 10 for i in range(num_samples)]
    prompts = [digit_prompt(d, i // 10) for i, d in enumerate(digits)]
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    size = classifier_input_size(pipe)
    correct = 0
    bar = tqdm(total=num_samples, desc="pretrain: evaluate", disable=not progress)
    for start in range(0, num_samples, batch_size):
        chunk = prompts[start : start + batch_size]
        images = pipe(
            chunk,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            eta=sampling.eta,
            generator=generator,
            output_type="pt",
        ).images
        predicted = classifier.to(images.device)(to_grayscale(images, size)).argmax(-1).cpu()
        correct += (predicted == torch.tensor(digits[start : start + len(chunk)])).sum().item()
        bar.update(len(chunk))
    bar.close()
    return correct / num_samples


def classifier_input_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def pretrain_reference(config: PipelineConfig, home: Path, progress: bool = True) -> PretrainResult:
    """Build (or reuse from the cache) the embedded reference model on ``config.runtime.device``; see the
    module docstring. The device is not part of the key: what is saved is the same model (fp32 weights; on
    the CPU byte-identical for a seed and thread count). A damaged cache is rebuilt with the thread count its
    metadata records, so that base models trained on it still match (``reference_hash``)."""
    device = resolve_device(config.runtime.device)  # a missing device fails here, in one line
    key = reference_key(config)
    final = home / "reference" / key
    threads = _recorded_threads(final) if final.exists() else None  # read before a damaged one is removed
    if threads:
        how = f" with the {threads} torch threads it was built with"
    else:
        how = (
            f" with {torch.get_num_threads()} torch threads (its metadata does not say how many it was built "
            f"with): if that differs, base models trained on the old reference need retraining"
        )
    reference_hash = _reusable_cache(final, "reference model", check_reference_cache, how)
    if reference_hash is not None:
        meta = _current_evaluation(config, home, final, progress)
        return PretrainResult(
            path=final,
            alignment_accuracy=meta["alignment_accuracy"],
            classifier_test_accuracy=meta["classifier_test_accuracy"],
            pretrain_seconds=meta["pretrain_seconds"],
            cached=True,
            key=key,
            reference_hash=reference_hash,
        )

    # the same thread count as the damaged build, so the same model and hash as base models recorded
    with _torch_threads(threads):
        return _build_reference(config, home, final, key, device, progress)


def _recorded_threads(folder: Path) -> int | None:
    """The torch thread count the cached reference in ``folder`` records it was built with, or ``None``."""
    try:
        threads = json.loads((folder / META_FILE).read_text()).get("torch_threads")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else None


@contextmanager
def _torch_threads(count: int | None):
    """Run with ``count`` torch threads (the current count when ``None``), restoring the count after."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_reference(config: PipelineConfig, home: Path, final: Path, key: str, device, progress: bool):
    check_writable(final.parent)  # before the pretraining, not after
    start = time.perf_counter()
    pretrain, cfg = config.pretrain, config.model.embedded
    classifier, report = digit_classifier(config, home, progress)
    torch.manual_seed(pretrain.seed)
    generator = torch.Generator().manual_seed(pretrain.seed)
    train, _ = train_test_split(cfg.image_size, pretrain.test_fraction, seed=0)
    components = build_components(cfg)  # initialised on the CPU (same weights for a seed), then moved
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(device)
    latents = train_vae(components["vae"], train.images, pretrain, generator, progress)
    components["unet"], components["text_encoder"] = train_denoiser(
        components, latents, train.labels, pretrain, generator, progress
    )

    for name in ("unet", "vae", "text_encoder"):
        components[name].to("cpu")
    # keep_existing: a concurrent build that won the race is kept
    with staged_directory(final, keep_existing=True) as tmp:
        save_pipeline(components, tmp)
        accuracy = alignment_accuracy(
            load_embedded_pipeline(tmp).to(device),
            classifier,
            config.sampling,
            pretrain.eval_samples,
            pretrain.seed,
            progress,
        )
        seconds = time.perf_counter() - start
        meta = _reference_meta(config, key, accuracy, report, seconds)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _seal(tmp)
    # ``final`` is ours, or a concurrent build's that won the race: the same model either way
    reference_hash = content_hash(final)
    return PretrainResult(final, accuracy, report.test_accuracy, seconds, False, key, reference_hash)


def _evaluation_settings(config: PipelineConfig) -> dict:
    return {"samples": config.pretrain.eval_samples, **config.sampling.model_dump()}


def _current_evaluation(config: PipelineConfig, home: Path, final: Path, progress: bool) -> dict:
    """The cached model's metadata; re-measures alignment if the sampling settings changed since."""
    meta = json.loads((final / META_FILE).read_text())
    settings = _evaluation_settings(config)
    if {k: meta["alignment_eval"].get(k) for k in settings} != settings:
        classifier, _ = digit_classifier(config, home, progress)
        meta["alignment_accuracy"] = alignment_accuracy(
            load_embedded_pipeline(final).to(resolve_device(config.runtime.device)),
            classifier,
            config.sampling,
            config.pretrain.eval_samples,
            config.pretrain.seed,
            progress,
        )
        meta["alignment_eval"].update(settings)
        with atomic_file(final / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
    return meta


def _reference_meta(
    config: PipelineConfig, key: str, accuracy: float, report: ClassifierReport, seconds: float
):
    return {
        "key": key,
        "format": FORMAT_VERSION,
        "alignment_accuracy": accuracy,
        "alignment_eval": {
            **_evaluation_settings(config),
            "prompts": [digit_prompt(d) for d in range(len(DIGIT_WORDS))],
        },
        "classifier_test_accuracy": report.test_accuracy,
        "pretrain_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "config": {
            "model": config.model.embedded.model_dump(mode="json"),
            "pretrain": config.pretrain.model_dump(),
        },
        "data": data_fingerprint(),
    }


def result_dict(result: PretrainResult) -> dict:
    out = asdict(result)
    out["path"] = str(result.path)
    return out
