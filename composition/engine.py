"""Composition on demand: load K base models onto the reference, sample with any method, score the images.

This is the plain-function layer under ``msdda compose``, ``msdda sweep`` and the Prefect flows:

* :func:`load_ensemble` reads the base models' folders through their cards (``training.card``), refuses models
  trained on different references or schedulers, and puts their LoRA adapters on one copy of the reference
  UNet;
* :func:`generate` samples ``num_images`` images with a method (same prompts and seeds for every method);
* :func:`score_generated` returns mean reward and standard error per objective.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from composition.batched import compile_unet, load_adapter
from composition.methods import METHODS, Batch, Composer, Method, check_finite
from configs.errors import MsddaError, first_line
from configs.schema import CompositionConfig, PipelineConfig
from training.card import LoadedBaseModel, check_adapted_modules, check_lineage, load_base_model
from training.images import to_uint8
from training.sd_problem import decode_latents
from training.step.kernel import DDIMSchedule, draw_noise


class CompositionError(MsddaError, ValueError):
    """Bad composition input (weights, models, method), reported as one line."""


def get_method(name: str) -> Method:
    """The registered method ``name``; a one-line error naming the choices otherwise."""
    if name not in METHODS:
        raise CompositionError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_weights(text: str | list[float], num_models: int) -> list[float]:
    """``"0.3,0.7"`` -> ``[0.3, 0.7]``; one-line errors for malformed, non-finite or wrong-length vectors."""
    if isinstance(text, str):
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise CompositionError(f"weights '{text}' are not a comma-separated list of numbers") from None
    else:
        values = [float(v) for v in text]
    if not all(math.isfinite(v) for v in values):
        raise CompositionError(f"weights must be finite numbers, got {values}")
    if len(values) != num_models:
        raise CompositionError(f"{len(values)} weights given for {num_models} base models")
    return values


# ----------------------------------------------------------------------------------------------- the ensemble


@dataclass
class RewardCalls:
    """Reward evaluations while sampling (the cost NFE does not count): one per scored image, a decode plus
    every objective's reward; a reward gradient counts two (docs/design.md §3.8)."""

    count: float = 0.0


@dataclass
class Ensemble:
    """The reference pipeline with K base-model adapters loaded, the rewards, prompts and the schedule."""

    pipe: object
    models: list[LoadedBaseModel]
    rewards: dict[str, object]
    schedule: DDIMSchedule
    guidance_scale: float
    prompts: list[str]
    reference_hash: str
    _embeds: dict = field(default_factory=dict)
    _compiled: dict = field(default_factory=dict)

    @property
    def objectives(self) -> list[str]:
        return [m.objective for m in self.models]

    @property
    def device(self) -> torch.device:
        """Where the pipeline (and so sampling and scoring) runs: ``runtime.device`` at load time."""
        return self.pipe.unet.device

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._embeds:
            from training.sd_problem import encode_prompts

            self._embeds["prompts"], self._embeds["uncond"] = encode_prompts(self.pipe, self.prompts)
        return self._embeds["prompts"], self._embeds["uncond"]

    def compiled_unet(self):
        """The UNet compiled for routed steps (:func:`composition.batched.compile_unet`), built once."""
        if "unet" not in self._compiled:
            self._compiled["unet"] = compile_unet(self.pipe.unet)
        return self._compiled["unet"]

    def composer(self, options: CompositionConfig) -> Composer:
        """The methods' view of the ensemble; with ``options.compile`` its UNet calls go through
        :meth:`compiled_unet`."""
        forward = self.compiled_unet() if options.compile else None
        return Composer(self.pipe.unet, self.schedule, self.guidance_scale, self.models, options, forward)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe.vae, latents)

    def score_fn(
        self,
        weights: list[float],
        prompts: list[str],
        per_beta: bool,
        differentiable: bool,
        calls: RewardCalls | None = None,
        beta: float | None = None,
    ):
        """``x0 latents -> sum_i c_i R_i(decode(x0))`` with ``c_i = w_i`` (or ``w_i / beta``, the target
        ``beta`` or else each model's ``beta_i``), each reward on its card's scale; the latents' rows are
        candidate-major repeats of ``prompts``. ``calls`` counts the scored rows (a decode and the rewards
        each; twice with a gradient)."""
        coefficients = [w / ((beta or m.beta) if per_beta else 1.0) for w, m in zip(weights, self.models)]
        scales = [m.card.reward_scale for m in self.models]

        def score(x0: torch.Tensor) -> torch.Tensor:
            if calls is not None:
                calls.count += len(x0) * (2 if differentiable else 1)
            decode = partial(decode_latents, self.pipe.vae) if differentiable else self.decode
            decoded = {}  # one decode for every image reward

            def decode_once(latents: torch.Tensor) -> torch.Tensor:
                if "images" not in decoded:
                    decoded["images"] = decode(latents)
                return decoded["images"]

            repeated = prompts * (len(x0) // len(prompts))
            total = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
            for c, scale, reward in zip(coefficients, scales, self.rewards.values()):
                if c != 0.0:
                    value = reward.score(x0, repeated, decode_once)
                    total = total + c * scale.standardise(value).to(total)
            return total

        return score

    def method_score(
        self, method: Method, weights: list[float], prompts: list[str], calls: RewardCalls, beta: float | None
    ):
        """The combined reward a search method calls (:meth:`score_fn` with the method's needs), or ``None``
        for a method that calls none."""
        if method.score is None:
            return None
        needs = method.score
        return self.score_fn(weights, prompts, needs.per_beta, needs.differentiable, calls, beta)

    def check_scores(self, method: Method) -> None:
        """Refuse a method that needs reward gradients when a reward has none."""
        if method.score is not None and method.score.differentiable:
            flat = [name for name, reward in self.rewards.items() if not reward.differentiable]
            if flat:
                raise CompositionError(
                    f"{method.name} needs differentiable rewards; not differentiable: {', '.join(flat)}"
                )


def check_reference_settings(models: list[LoadedBaseModel], config: PipelineConfig) -> None:
    """Refuse, in one line and before the reference is built or loaded, base models whose card says they were
    trained on a reference that cannot be ``config``'s. A hub checkpoint is named by its id and revision, any
    other reference by a content hash (a SHA-256); every ``model.embedded`` setting is in the embedded
    reference's files, so a card that recorded another value names other files. Only what certainly differs
    is refused: a model trained elsewhere on the same settings passes, and its ``reference_hash`` is compared
    with the reference's once that is there."""
    from training.reference.checkpoint import pretrained_identity

    model = config.model
    if model.source == "pretrained" and not Path(model.pretrained).expanduser().exists():
        check_lineage(models, pretrained_identity(config))  # a hub id: its identity costs nothing
        return
    ours = model.embedded.model_dump(mode="json")
    for m in models:
        where, recorded = f"base model '{m.objective}' ({m.path})", m.card.reference
        if not _is_content_hash(m.card.reference_hash):
            reference = model.pretrained if model.source == "pretrained" else "the embedded model"
            raise CompositionError(
                f"{where} was trained on the hub checkpoint {m.card.reference_hash}, but this config's "
                f"reference is {reference}: compose with the config it was trained with (its model section)"
            )
        theirs = recorded.get("embedded") if model.source == recorded.get("source") == "embedded" else None
        differing = sorted(k for k in ours.keys() & (theirs or {}).keys() if theirs[k] != ours[k])
        if differing:
            said = ", ".join(f"{k} {theirs[k]} (this config: {ours[k]})" for k in differing)
            raise CompositionError(
                f"{where} was trained on an embedded reference with other model.embedded settings ({said}): "
                f"compose with the config it was trained with, or train base models for this one"
            )


def _is_content_hash(value: str) -> bool:
    """Whether ``value`` can be a :func:`training.storage.content_hash` (a SHA-256 in hex)."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def attach_base_model(unet, model: LoadedBaseModel) -> None:
    """Put ``model``'s LoRA on ``unet`` (the reference's) as the adapter named ``model.objective``; a model
    adapting modules the reference lacks, or whose weights do not fit it, is a one-line error."""
    check_adapted_modules(unet, model.card)
    try:
        load_adapter(unet, model.objective, model.lora, model.card.lora)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CompositionError(
            f"base model '{model.objective}' at {model.path} does not fit the reference: {first_line(exc)}"
        ) from None


def load_ensemble(
    config: PipelineConfig,
    home: Path,
    model_dirs: list[Path],
    progress: bool = False,
    prompts: list[str] | None = None,
) -> Ensemble:
    """Load the reference and put every base model's LoRA adapter on its UNet (named by objective); the
    pipeline then moves to ``config.runtime.device`` with its weights in ``config.runtime.dtype``. The images
    cycle through ``prompts`` (default: the config's evaluation prompts, ``train.prompts`` or the embedded
    default's)."""
    from training.device import place_pipeline, resolve_runtime
    from training.reference.digits import default_prompts
    from training.reference.loader import reference_pipeline
    from training.rewards import load_reward

    device, dtype = resolve_runtime(config.runtime)  # a missing device fails here, before any loading

    models = [load_base_model(Path(p)) for p in model_dirs]
    check_lineage(models)
    check_reference_settings(models, config)  # before the reference is loaded, or pretrained
    pipe, reference_hash = reference_pipeline(config, home, progress)
    check_lineage(models, reference_hash)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    for m in models:
        attach_base_model(pipe.unet, m)
    place_pipeline(pipe, device, dtype)
    rewards = {
        m.objective: load_reward(m.card.reward.name, config, home, m.card.reward.options) for m in models
    }
    sampling = models[0].card.sampling or config.sampling.model_dump()
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, sampling["num_inference_steps"], sampling["eta"])
    return Ensemble(
        pipe,
        models,
        rewards,
        schedule,
        float(sampling["guidance_scale"]),
        list(prompts or config.train.prompts or default_prompts()),
        reference_hash,
    )


# ------------------------------------------------------------------------------------------- sample and score


@dataclass(kw_only=True)
class Generated:
    method: str
    weights: list[float]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    prompts: list[str]
    nfe_per_image: float
    seconds: float
    diagnostics: list[dict]
    reward_calls_per_image: float = 0.0
    path_kl: torch.Tensor | None = None
    """Per image, the path KL from the reference (``options.path_kl``); for CoDe its ``log N``-per-block
    bound."""
    latents: torch.Tensor | None = None
    """The final latents the images decode from (what latent rewards score)."""


def prepare_composer(composer, chosen: Method, method: str, weights: list[float]) -> None:
    """Check that ``weights`` give the composer its coefficients (differing betas need a target beta), in one
    line, and let the method prepare it."""
    try:
        composer.coefficients(weights)
    except ValueError as exc:
        raise CompositionError(f"{method} with weights {weights}: {exc}") from None
    if chosen.prepare is not None:
        chosen.prepare(composer, weights)


@torch.no_grad()
def sample_batch(
    composer,
    chosen: Method,
    weights: list[float],
    x_T: torch.Tensor,
    batch: Batch,
    generator: torch.Generator,
    score,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
):
    """The one sampling core of :func:`generate` and :class:`composition.pipeline.MSDDAPipeline`: the method's
    kernel (or search) through the chain runner for one batch, then ``decode`` (``None``: latents only).

    Returns ``(chain, nfe, images)``; a non-finite result or a failing step (e.g. a non-positive composed
    precision) is one :class:`CompositionError` line."""
    try:
        chain, nfe = chosen.sample(composer, weights, x_T, batch, generator, score)
        images = None if decode is None else decode(chain.latents)
        outputs = [chain.latents] if images is None else [chain.latents, images]
        check_finite("the sampled latents or their images", *outputs)
    except MsddaError:
        raise
    except ValueError as exc:
        raise CompositionError(f"{chosen.name} with weights {weights}: {exc}") from None
    return chain, nfe, images


def batch_seeds(seed: int, batch_index: int) -> tuple[int, int]:
    """Independent seeds for a batch's initial noise and its step noise (the same for every method)."""
    base = (seed * 1_000_003 + batch_index * 7919) % (2**62)
    return base, base + 2**61


def generate(
    ensemble: Ensemble,
    method: str,
    weights: list[float],
    options: CompositionConfig,
    num_images: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> Generated:
    """Sample ``num_images`` images for ``weights`` with ``method``; prompts cycle through the prompt set and
    batch ``b`` draws its noise from :func:`batch_seeds` so every method sees the same ``x_T``. Sampling runs
    on the ensemble's device with fp32 latents (the UNet and VAE run in their own dtype); the images come back
    on the CPU. ``progress``: a bar over the images on stderr."""
    from tqdm.auto import tqdm

    num_images = num_images or options.num_images
    seed = options.seed if seed is None else seed
    weights = parse_weights(weights, len(ensemble.models))
    chosen = get_method(method)
    ensemble.check_scores(chosen)
    embeds, uncond = ensemble.embeddings()
    composer = ensemble.composer(options)
    prepare_composer(composer, chosen, method, weights)
    unet = ensemble.pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    images, latents, prompts, diagnostics, nfe, calls, kls = [], [], [], [], 0.0, RewardCalls(), []
    start = time.perf_counter()
    bar = tqdm(total=num_images, desc=f"compose: {method}", unit="image", disable=not progress)
    for batch_index, first in enumerate(range(0, num_images, options.batch_size)):
        index = torch.arange(first, min(first + options.batch_size, num_images)) % len(ensemble.prompts)
        batch_prompts = [ensemble.prompts[i] for i in index.tolist()]
        x_seed, noise_seed = batch_seeds(seed, batch_index)
        x_T = draw_noise((len(index), *shape), torch.Generator().manual_seed(x_seed), device=unet.device)
        score = ensemble.method_score(chosen, weights, batch_prompts, calls, options.beta)
        generator = torch.Generator().manual_seed(noise_seed)
        chain, nfe, decoded = sample_batch(
            composer, chosen, weights, x_T, Batch(embeds[index], uncond), generator, score, ensemble.decode
        )
        images.append(decoded.cpu())
        latents.append(chain.latents.cpu())
        if chain.kl is not None:
            kls.append(chain.kl.detach().cpu())
        prompts.extend(batch_prompts)
        diagnostics.extend(chain.diagnostics if batch_index == 0 else [])
        bar.update(len(index))
    bar.close()
    seconds = time.perf_counter() - start
    path_kl = torch.cat(kls) if kls else None
    return Generated(
        method=method,
        weights=weights,
        images=torch.cat(images),
        prompts=prompts,
        nfe_per_image=nfe,
        seconds=seconds,
        diagnostics=diagnostics,
        reward_calls_per_image=calls.count / num_images,
        path_kl=path_kl,
        latents=torch.cat(latents),
    )


@torch.no_grad()
def score_generated(ensemble: Ensemble, generated: Generated) -> dict[str, torch.Tensor]:
    """Per-image rewards ``{objective: [N]}`` of generated images (on the CPU), scored on the ensemble's
    device; latent rewards score the images' latents."""
    images, latents = generated.images.to(ensemble.device), generated.latents.to(ensemble.device)
    return {
        name: reward.score(latents, generated.prompts, lambda _: images).detach().float().cpu()
        for name, reward in ensemble.rewards.items()
    }


IMAGES_MANIFEST = "manifest.json"
GRID_FILE = "grid.png"
WRITTEN_BY = "msdda compose"
"""The manifest's ``written_by`` mark: a folder whose manifest carries it was written by ``msdda compose``."""


STAGING_PREFIX = ".images-"
"""Compose stages its files in a hidden folder so named: beside a new image folder, inside an existing one."""


def _entries(folder: Path) -> list[Path]:
    """``folder``'s entries, but the staging folders composes in flight (or killed) keep inside it."""
    return [
        entry
        for entry in folder.iterdir()
        if not (entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink())
    ]


def _written(folder: Path) -> tuple[str, set[str]] | None:
    """The manifest's ``compose_id`` (empty in manifests older than it) and the files compose wrote in
    ``folder`` (its manifest with the mark, the images it lists, their grid) when that is all the folder
    holds; ``None`` otherwise."""
    try:
        manifest = json.loads((folder / IMAGES_MANIFEST).read_text(encoding="utf-8"))
        written = {IMAGES_MANIFEST, GRID_FILE, *(image["file"] for image in manifest["images"])}
        if manifest["written_by"] == WRITTEN_BY and all(
            entry.name in written and entry.is_file() and not entry.is_symlink() for entry in _entries(folder)
        ):
            return str(manifest.get("compose_id", "")), written
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def is_image_folder(folder: Path) -> bool:
    """Whether ``folder`` holds only what compose wrote there: a manifest with its mark, the images the
    manifest lists and their grid. Only such a folder may be replaced by another compose."""
    return _written(folder) is not None


def folder_state(folder: Path) -> str:
    """What is at ``folder``: ``absent``, ``empty`` (nothing but compose's staging folders), ``compose <id>``
    (:func:`is_image_folder`, with its manifest's ``compose_id``) or ``other`` (a file, or a folder holding
    anything else)."""
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        return "other"
    if not _entries(folder):
        return "empty"
    written = _written(folder)
    return "other" if written is None else f"compose {written[0]}"


@dataclass(frozen=True)
class ImageFolder:
    """Where compose publishes its images (absolute), and what :func:`check_image_folder` found there: it
    publishes only if that is still there (:func:`staged_images`)."""

    path: Path
    found: str
    """:func:`folder_state` at the check: ``absent``, ``empty`` or ``compose <id>``."""
    identity: tuple[int, int] | None = None
    """``(device, inode)`` of the folder found, if any."""


@contextmanager
def _locked(folder: Path, wait: bool = True) -> Iterator[tuple[int, int]]:
    """Hold an exclusive lock on ``folder`` itself (``flock``, released when the process dies); yields the
    ``(device, inode)`` of the folder locked. With ``wait=False``, only check that it can be locked."""
    import fcntl

    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            if wait:
                raise
        status = os.fstat(handle)
        yield status.st_dev, status.st_ino
    finally:
        os.close(handle)  # releases the lock


def check_image_folder(folder: Path) -> ImageFolder:
    """``folder`` made absolute (``.``, ``..`` and links resolved), and what is there, once checked before
    any sampling that compose can write it without losing anything: a one-line :class:`CompositionError` for
    a file, the current folder or one above it, a non-empty folder compose did not write
    (:func:`is_image_folder`), a path under a file, or a place this process cannot write (where the files are
    staged: inside an existing folder, beside a new one; see :func:`staged_images`)."""
    given = Path(folder).expanduser()
    try:
        folder = given.resolve()
        here = Path.cwd().resolve()
        found = folder_state(folder)
        if folder == here or folder in here.parents:
            problem = "is the current folder or one above it"
        elif found == "other" and not folder.is_dir():
            problem = "is a file"
        elif found == "other":
            problem = "holds files that msdda compose did not write (it replaces only its own image folders)"
        else:
            problem = None
        if problem:
            raise CompositionError(f"image folder {given} {problem}: name a new or empty folder")
        # where the files are staged: inside an existing folder, else where it (and its parents) is made
        stage = folder if found != "absent" else next(p for p in folder.parents if p.exists())
        if not stage.is_dir():
            raise CompositionError(f"cannot create the image folder {given}: {stage} is a file")
        Path(tempfile.mkdtemp(prefix=".probe-", dir=stage)).rmdir()  # writable (os.access ignores root)
        identity = None
        if found != "absent":
            with _locked(folder, wait=False) as identity:  # the file system takes the lock publishing takes
                pass
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CompositionError(f"cannot write the image folder {given}: {reason}") from None
    return ImageFolder(folder, found, identity)


def _changed(target: ImageFolder) -> CompositionError:
    return CompositionError(
        f"image folder {target.path} changed while this compose ran (another command wrote there): what is "
        f"there now is left as it is, and these images were not saved; rerun with another --out"
    )


@contextmanager
def staged_images(target: ImageFolder) -> Iterator[Path]:
    """Yield a staging folder for compose's files; when the block succeeds they are published at
    ``target.path``, when it fails the staging folder is removed.

    A new folder is staged beside ``target.path`` and renamed into place: it appears complete. An existing
    one (empty, or an earlier compose's) is kept as it is, with its mode and owner; it may be a mount point,
    or sit in a folder this process cannot write: the files are staged inside it and moved in, the manifest
    last, and then the earlier compose's files the new manifest does not list are removed.

    Only what was there at the check is replaced: if another command published there meanwhile (the folder
    appeared, or holds another compose's manifest), its files are kept and a :class:`CompositionError` says
    so. Publishers into an existing folder take turns on a lock on it (:func:`_locked`)."""
    final, new = target.path, target.found == "absent"
    if new:
        final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=final.parent if new else final))
    try:
        yield staged
        if new:
            staged.chmod(0o755)  # mkdtemp's 0700 would hide the folder from the rest of a team
            try:
                staged.rename(final)  # takes a free name or an empty folder, raises on anything else
            except OSError:
                if final.exists():
                    raise _changed(target) from None
                raise
            return
        with _locked(final) as identity:
            if identity != target.identity or folder_state(final) != target.found:
                raise _changed(target)
            earlier = (_written(final) or ("", set()))[1]
            files = sorted(staged.iterdir(), key=lambda path: path.name == IMAGES_MANIFEST)  # manifest last
            for path in files:
                os.replace(path, final / path.name)
            for name in earlier - {path.name for path in files}:
                (final / name).unlink(missing_ok=True)
        staged.rmdir()
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def write_images(images: torch.Tensor, prompts: list[str], folder: Path, manifest: dict) -> None:
    """PNG files plus ``manifest.json`` (``manifest`` with the mark :data:`WRITTEN_BY`, a new ``compose_id``,
    and the files and their prompts) in ``folder``, which the caller stages: see :func:`staged_images`."""
    from PIL import Image

    array = to_uint8(images)
    files = []
    for i, pixels in enumerate(array):
        name = f"{i:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        files.append({"file": name, "prompt": prompts[i]})
    mark = {"written_by": WRITTEN_BY, "compose_id": secrets.token_hex(8)}  # each publication its own id
    text = json.dumps({**mark, **manifest, "images": files}, indent=2)
    (folder / IMAGES_MANIFEST).write_text(text, encoding="utf-8")
