"""``MSDDAPipeline``: denoising-time composition as a diffusers pipeline, for use from Python.

A :class:`~diffusers.StableDiffusionPipeline` on the reference model that also holds K base models (their LoRA
adapters on its UNet, their learned variances and cards) and samples their composition with any registered
method (:data:`composition.methods.METHODS`). It is a thin layer over the code ``msdda compose`` runs: the
methods' kernels and searches, the batched LoRA routing (``composition.batched``), the chain runner and the
engine's scoring (:class:`composition.engine.Ensemble`); for the same models, method, weights and seed it
gives the images :func:`composition.engine.generate` gives.

Layering: this module is the library's front door. It resolves registry specs (``NAME@ALIAS``) through
``flows.registry``, imported only when a spec is given; that is the one import of ``flows`` from
``composition`` (docs/architecture.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput, replace_example_docstring

from composition.batched import clear_stacked, compile_unet
from composition.engine import (
    CompositionError,
    Ensemble,
    RewardCalls,
    attach_base_model,
    batch_seeds,
    get_method,
    parse_weights,
    prepare_composer,
    sample_batch,
)
from composition.methods import DEFAULT_METHOD, SOUP_ADAPTER, Batch, Composer
from configs.errors import MsddaError, first_line
from configs.schema import CompositionConfig, PipelineConfig
from training.card import LoadedBaseModel, check_lineage, load_base_model, scheduler_identity
from training.sd_problem import decode_latents, encode_prompts
from training.step.kernel import draw_noise

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from composition.pipeline import MSDDAPipeline

        >>> # the embedded default reference, as `msdda pretrain` built it under $MSDDA_HOME
        >>> # (or MSDDAPipeline.from_pretrained(folder_or_hub_id) for any Stable Diffusion checkpoint)
        >>> pipe = MSDDAPipeline.from_embedded()
        >>> pipe.load_base_model("msdda-digit_alignment@champion")  # a registered base model
        >>> pipe.load_base_model("msdda-ink_economy@champion")  # or a base-model folder
        >>> list(pipe.base_models)  # the order of the weights
        ['digit_alignment', 'ink_economy']
        >>> output = pipe("a handwritten digit seven", weights=[0.3, 0.7], num_images_per_prompt=2)
        >>> output.images[0].save("seven.png")
        >>> output.nfe == 2 * pipe.base_models["ink_economy"].card.sampling["num_inference_steps"]
        True
        ```
"""

SAMPLING_KEYS = ("num_inference_steps", "eta", "guidance_scale")
"""The cards' sampling settings a composition uses (the learned variances are per step)."""
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass
class MSDDAPipelineOutput(BaseOutput):
    """What :meth:`MSDDAPipeline.__call__` returns.

    Args:
        images: ``len(prompts) * num_images_per_prompt`` images, prompt-major: PIL images (``"pil"``), an
            array ``[N, H, W, 3]`` in [0, 1] (``"np"``), a tensor ``[N, 3, H, W]`` in [0, 1] on the CPU
            (``"pt"``) or the final latents (``"latent"``).
        nfe: UNet rows per image the method ran (classifier-free guidance counts two, a backward pass two).
        reward_calls: reward evaluations per image while sampling (CoDe, RGG; docs/design.md §3.8).
        path_kl: per image, the path KL from the reference when ``options={"path_kl": True}``, else ``None``.
    """

    images: object
    nfe: float
    reward_calls: float
    path_kl: torch.Tensor | None = None


@dataclass(frozen=True)
class PipelineBaseModel(LoadedBaseModel):
    """A base model loaded into an :class:`MSDDAPipeline`: its card, LoRA and variance, under ``name``.

    ``objective`` is ``name`` (the adapter's name on the UNet, which the composition code addresses it by:
    the card's objective unless ``adapter_name`` was given); ``card.objective`` is what it was trained for.
    """

    name: str = ""
    source: str = ""
    """What it was loaded from: its folder, or the registered version (``msdda-<objective>/<version>``)."""

    @property
    def objective(self) -> str:
        return self.name


@dataclass
class _State:
    reference_hash: str | None = None
    reference: str | None = None
    config: PipelineConfig = field(default_factory=PipelineConfig)
    home: Path | None = None
    models: dict[str, PipelineBaseModel] = field(default_factory=dict)
    rewards: dict = field(default_factory=dict)
    compiled: object = None


class _SteppedComposer(Composer):
    """The methods' :class:`Composer`, telling ``on_step(step, x)`` when a step is done: every method runs
    its UNet through :meth:`epsilons`, so the first evaluation of step ``s + 1`` sees the state step ``s``
    produced (for CoDe, the N candidate chains stacked). The last step is told by the caller."""

    def __init__(self, *args, on_step: Callable[[int, torch.Tensor], None], **kwargs):
        super().__init__(*args, **kwargs)
        self._on_step, self._current = on_step, -1

    def epsilons(self, x: torch.Tensor, step: int, batch: Batch, adapters: list[str]) -> torch.Tensor:
        if step > self._current:
            if self._current >= 0:
                self._on_step(self._current, x.detach())
            self._current = step
        return super().epsilons(x, step, batch, adapters)


def _delete_adapter(unet, name: str) -> None:
    """Remove adapter ``name`` from ``unet`` and drop the routed weights built with it. Which adapter peft
    calls active does not matter here (routing picks the adapters per call): its note on that is silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="Adapter .* was active which is now deleted",
            category=UserWarning,
            module=r"peft\.",
        )
        unet.delete_adapters(name)
    clear_stacked(unet)


def _normalised(scheduler: dict) -> dict:
    """A scheduler config as its card stores it (JSON values, no bookkeeping keys)."""
    return json.loads(json.dumps(scheduler_identity(dict(scheduler)), default=str))


def _as_config(config: PipelineConfig | str | Path | None) -> PipelineConfig | None:
    from configs.schema import load_config

    if config is None or isinstance(config, PipelineConfig):
        return config
    return load_config(config)


class MSDDAPipeline(StableDiffusionPipeline):
    r"""Compose LoRA base models of a Stable Diffusion reference at denoising time (MSDDA and the baselines).

    Load the reference with :meth:`from_pretrained` (a folder or hub id, as for
    :class:`~diffusers.StableDiffusionPipeline`) or :meth:`from_embedded` (the embedded default in
    ``$MSDDA_HOME``), add base models with :meth:`load_base_model` (a base-model folder or a registry spec
    such as ``msdda-digit_alignment@champion``), then call the pipeline with one weight per base model. Each
    base model must have been trained on this reference (its card's ``reference_hash``); the number of steps,
    ``eta`` and the guidance scale are the base models' own (their cards' sampling settings).

    Everything else is the diffusers pipeline's: ``.to(device)``, ``set_progress_bar_config``, the
    components. The safety checker is off (``safety_checker=None``), as for every reference msdda loads.
    """

    # ---------------------------------------------------------------------------------------------- loading

    @property
    def _msdda(self) -> _State:
        return self.__dict__.setdefault("_msdda_state", _State())

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        msdda_config: PipelineConfig | str | Path | None = None,
        msdda_home: str | Path | None = None,
        **kwargs,
    ) -> MSDDAPipeline:
        """The reference pipeline at ``pretrained_model_name_or_path`` (a saved pipeline folder or a hub id),
        with diffusers' keywords (``torch_dtype``, ``local_files_only``, ``revision``, ``variant``, ...).

        Its identity, which base models' cards must name, is the content hash of a folder
        (:func:`training.storage.content_hash`), or ``<hub id>@<revision>`` for a hub id, as ``msdda train``
        records them. ``msdda_config`` (a config or its YAML path) and ``msdda_home`` are what rewards and
        registry specs are loaded with; by default, for a folder of the embedded model, the settings it was
        built with and the home it lies in (``<home>/reference/<key>``), else the default config with this
        checkpoint as its model and ``$MSDDA_HOME``. A missing or unreadable checkpoint is one line
        (:class:`training.storage.ModelLoadError`).
        """
        from training.reference.checkpoint import check_checkpoint
        from training.reference.embedded import META_FILE
        from training.storage import ModelLoadError, content_hash
        from training.storage import msdda_home as default_home

        reference_hash = kwargs.pop("_reference_hash", None)
        source = str(pretrained_model_name_or_path)
        check_checkpoint(source)
        local = Path(source).expanduser()
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
        try:
            pipe = super().from_pretrained(str(local) if local.exists() else source, **kwargs)
        except (OSError, ValueError) as exc:
            where = "local files" if local.exists() else "the local hub cache (offline) or the hub"
            raise ModelLoadError(
                f"cannot load Stable Diffusion weights '{source}' from {where}: {first_line(exc)}"
            ) from None
        config, home = _as_config(msdda_config), Path(msdda_home).expanduser() if msdda_home else None
        meta = local / META_FILE
        if local.exists():
            reference_hash = reference_hash or content_hash(local)
            if config is None and meta.is_file():  # the embedded model: the settings it was built with
                built = json.loads(meta.read_text())["config"]
                config = PipelineConfig(model={"embedded": built["model"]}, pretrain=built["pretrain"])
            if home is None and meta.is_file() and local.resolve().parent.name == "reference":
                home = local.resolve().parent.parent
        else:
            reference_hash = (
                f"{source}@{kwargs.get('revision')}"  # as training.reference.checkpoint.pretrained_identity
            )
        if config is None:
            model = {"source": "pretrained", "pretrained": source, "revision": kwargs.get("revision")}
            config = PipelineConfig(model=model)
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            part.requires_grad_(False)
        state = pipe._msdda
        state.reference_hash, state.reference = reference_hash, str(local) if local.exists() else source
        state.config, state.home = config, home or default_home()
        return pipe

    @classmethod
    def from_embedded(
        cls,
        config: PipelineConfig | str | Path | None = None,
        home: str | Path | None = None,
        progress: bool = False,
        **kwargs,
    ) -> MSDDAPipeline:
        """The reference an msdda config names (default: ``configs/default.yaml``), as ``msdda compose`` loads
        it: the embedded default, built once by ``msdda pretrain`` (or here, ``progress`` showing it) and
        cached under ``home`` (default ``$MSDDA_HOME``), or the checkpoint of its ``model.pretrained``. The
        pipeline is placed on the config's ``runtime.device`` in its ``runtime.dtype``."""
        from configs.schema import load_config
        from training.device import resolve_runtime
        from training.storage import msdda_home

        config = _as_config(config) or load_config()
        home = Path(home).expanduser() if home else msdda_home()
        device, dtype = resolve_runtime(config.runtime)  # a missing device fails before any loading
        if dtype != torch.float32 and not {"dtype", "torch_dtype"} & kwargs.keys():
            kwargs["torch_dtype"] = dtype  # weights load in it (diffusers >= 0.42 also reads `dtype`)
        if config.model.source == "pretrained":
            kwargs.setdefault("revision", config.model.revision)
            pipe = cls.from_pretrained(
                config.model.pretrained, msdda_config=config, msdda_home=home, **kwargs
            )
        else:
            from training.reference.embedded import pretrain_reference

            reference = pretrain_reference(config, home, progress=progress)
            kwargs.setdefault("use_safetensors", True)
            pipe = cls.from_pretrained(
                reference.path,
                msdda_config=config,
                msdda_home=home,
                _reference_hash=reference.reference_hash,
                **kwargs,
            )
        return pipe.to(device)

    @property
    def reference_hash(self) -> str | None:
        """The reference's identity, as base models' cards record it (``None``: built from components)."""
        return self._msdda.reference_hash

    @property
    def msdda_config(self) -> PipelineConfig:
        """The config rewards are loaded with; its ``composition`` section holds the methods' defaults."""
        return self._msdda.config

    @property
    def msdda_home(self) -> Path:
        """Where rewards' models are cached and registry specs are resolved."""
        if self._msdda.home is None:
            from training.storage import msdda_home

            self._msdda.home = msdda_home()
        return self._msdda.home

    @property
    def base_models(self) -> Mapping[str, PipelineBaseModel]:
        """The loaded base models by name, in the order of the weights (read-only)."""
        return MappingProxyType(self._msdda.models)

    def load_base_model(self, model: str | Path, adapter_name: str | None = None) -> None:
        """Load a base model: its LoRA onto the UNet (as adapter ``adapter_name``, default its objective), its
        learned variance and its card. ``model`` is a base-model folder or a registry spec (``NAME``,
        ``NAME@ALIAS``, ``NAME/VERSION``; ``NAME`` may be the objective), resolved with the pipeline's home
        and MLflow store. Refused in one line: a model trained on another reference than this pipeline's, or
        with another scheduler or sampling settings than those loaded, a name already loaded, a damaged
        folder."""
        state = self._msdda
        if state.reference_hash is None:
            raise CompositionError(
                "this pipeline does not know which reference it holds (made from components): load it with "
                "MSDDAPipeline.from_pretrained(folder_or_hub_id) or MSDDAPipeline.from_embedded()"
            )
        folder, source = self._resolve(model)
        loaded = load_base_model(folder)
        name = loaded.card.objective if adapter_name is None else adapter_name
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
            raise CompositionError(
                f"adapter name {name!r} is not valid: use letters, digits, '_' and '-' (not first)"
            )
        if name in state.models:
            raise CompositionError(
                f"a base model named '{name}' is already loaded (from {state.models[name].source}): "
                f"unload it with pipe.unload_base_model('{name}') or pass another adapter_name"
            )
        named = PipelineBaseModel(loaded.path, loaded.card, loaded.lora, loaded.log_variance, name, source)
        if loaded.card.reference_hash != state.reference_hash:
            raise CompositionError(
                f"base model '{name}' ({source}) was trained on the reference "
                f"{loaded.card.reference_hash[:12]}, not on this pipeline's ({state.reference_hash[:12]}, "
                f"{state.reference}): load it into a pipeline of its own reference"
            )
        check_lineage([*state.models.values(), named])  # one scheduler config for all
        if state.models:
            first = next(iter(state.models.values()))
            ours, theirs = self._sampling(first), self._sampling(named)
            differing = [k for k in SAMPLING_KEYS if ours[k] != theirs[k]]
            if differing:
                said = ", ".join(f"{k} {theirs[k]} (loaded: {ours[k]})" for k in differing)
                raise CompositionError(
                    f"base model '{name}' ({source}) was trained to sample with other settings than the "
                    f"loaded ones: {said}"
                )
        self._drop_soup()
        device, dtype = self.unet.device, self.unet.dtype
        try:
            attach_base_model(self.unet, named)
        except BaseException:
            if name in (getattr(self.unet, "peft_config", None) or {}):
                _delete_adapter(self.unet, name)
            clear_stacked(self.unet)
            raise
        self.unet.to(device=device, dtype=dtype).requires_grad_(False)  # the new adapter where the rest is
        state.models[name] = named

    def unload_base_model(self, name: str) -> None:
        """Remove the base model ``name`` (its adapter, variance and card)."""
        state = self._msdda
        if name not in state.models:
            loaded = ", ".join(state.models) or "none"
            raise CompositionError(f"no base model named '{name}' is loaded; loaded: {loaded}")
        self._drop_soup()
        _delete_adapter(self.unet, name)
        del state.models[name]

    def _drop_soup(self) -> None:
        """The rewarded soup's merged adapter is built for one set of base models: drop it when that
        changes."""
        if SOUP_ADAPTER in (getattr(self.unet, "peft_config", None) or {}):
            _delete_adapter(self.unet, SOUP_ADAPTER)

    def _resolve(self, model: str | Path) -> tuple[Path, str]:
        """``(folder, how to name where it came from)`` of a base-model folder or registry spec."""
        path = Path(model).expanduser()
        if path.is_dir():
            return path, str(path)
        text = str(model)
        if isinstance(model, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1:
            raise CompositionError(
                f"no base-model folder at {text}: name a folder `msdda train` wrote, or a registry spec "
                f"(NAME, NAME@ALIAS or NAME/VERSION)"
            )
        from flows.registry import resolve  # the registry lives in flows: imported only for a spec

        resolved = resolve(self.msdda_home, text)
        return resolved.path, f"{resolved.name}/{resolved.version}"

    def _sampling(self, model: LoadedBaseModel) -> dict:
        sampling = model.card.sampling or self.msdda_config.sampling.model_dump()
        return {k: sampling[k] for k in SAMPLING_KEYS}

    # ----------------------------------------------------------------------------------------------- inputs

    def _check_sampling(self, explicit: dict) -> dict:
        """The cards' sampling settings; an explicit value that differs is a one-line error."""
        cards = self._sampling(next(iter(self._msdda.models.values())))
        for key, value in explicit.items():
            if value is not None and float(value) != float(cards[key]):
                raise CompositionError(
                    f"{key}={value} differs from the base models' {key} {cards[key]} (their cards; the "
                    f"learned variances are per step): leave {key} out"
                )
        return cards

    def _check_scheduler(self) -> None:
        """The scheduler must be the one the base models were trained with (a swapped one is refused)."""
        card = next(iter(self._msdda.models.values())).card
        ours, theirs = _normalised(self.scheduler.config), _normalised(card.scheduler)
        if ours != theirs:
            keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise CompositionError(
                f"pipe.scheduler differs from the scheduler the base models were trained with (differing: "
                f"{', '.join(keys)}): set it back, e.g. pipe.scheduler = DDIMScheduler.from_config(...)"
            )

    def _options(self, options: CompositionConfig | dict | None, beta: float | None) -> CompositionConfig:
        from pydantic import ValidationError

        update = options.model_dump() if isinstance(options, CompositionConfig) else dict(options or {})
        if beta is not None:
            update["beta"] = beta
        try:
            return CompositionConfig.model_validate({**self.msdda_config.composition.model_dump(), **update})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise CompositionError(f"composition option {where}: {error['msg']}") from None

    def _rewards(self, rewards, method: str) -> dict:
        """One reward per base model, by name: reward names (loaded with the pipeline's config and home, and
        the card's options when the name is its own) or :class:`training.rewards.Reward` objects."""
        from training.rewards import Reward, load_reward

        models = self._msdda.models
        if rewards is None:
            own = [m.card.reward.name for m in models.values()]
            raise CompositionError(
                f"{method} calls rewards while sampling: pass rewards=, one per base model in their order, "
                f"e.g. rewards={own!r} (their own)"
            )
        if isinstance(rewards, (str, Reward)):
            rewards = [rewards]
        if isinstance(rewards, Mapping):
            missing = [name for name in models if name not in rewards]
            unknown = [name for name in rewards if name not in models]
            if missing or unknown:
                raise CompositionError(
                    f"rewards= names base models {sorted(rewards)}, the loaded ones are {list(models)}"
                )
            rewards = [rewards[name] for name in models]
        rewards = list(rewards)
        if len(rewards) != len(models):
            raise CompositionError(f"{len(rewards)} rewards given for {len(models)} base models")
        out = {}
        for (name, model), reward in zip(models.items(), rewards):
            if isinstance(reward, str):
                options = model.card.reward.options if reward == model.card.reward.name else {}
                key = (reward, json.dumps(options, sort_keys=True, default=str))
                if key not in self._msdda.rewards:
                    self._msdda.rewards[key] = load_reward(
                        reward, self.msdda_config, self.msdda_home, options
                    )
                reward = self._msdda.rewards[key]
            elif not isinstance(reward, Reward):
                raise CompositionError(
                    f"the reward for base model '{name}' is a {type(reward).__name__}: give a reward name or "
                    f"a training.rewards.Reward"
                )
            out[name] = reward
        return out

    @staticmethod
    def _check_readable(ensemble: Ensemble, prompts: list[str], latents: torch.Tensor) -> None:
        """Each reward scores the prompts once, on one image each, before any sampling: a prompt a reward
        cannot read fails here, in one line, and not after the first block of work."""
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():
            images = decode_latents(ensemble.pipe.vae, latents[: len(unique)])
            for name, reward in ensemble.rewards.items():
                try:
                    reward.score(latents[: len(unique)], unique, lambda _: images)
                except (MsddaError, ValueError, KeyError, IndexError) as exc:
                    raise CompositionError(
                        f"the reward {reward.name!r} of base model '{name}' cannot score these prompts: "
                        f"{first_line(exc)}"
                    ) from None

    # ----------------------------------------------------------------------------------------------- sample

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Sequence[float] | str | None = None,
        method: str = DEFAULT_METHOD,
        beta: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        rewards=None,
        seed: int | None = None,
        options: CompositionConfig | dict | None = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
    ):
        r"""Sample the composition of the loaded base models for ``prompt`` with ``weights``.

        Args:
            prompt: a prompt or a list of prompts (the unconditional prompt is the empty one).
            weights: one weight per base model, in the order of :attr:`base_models` (``"0.3,0.7"`` also).
            method: a method of :data:`composition.methods.METHODS`: ``msdda`` (default), ``db`` (epsilon
                blend), ``rs`` (rewarded soup), ``code`` (blockwise best-of-N) or ``rgg`` (reward-gradient
                guidance); ``msdda methods`` lists them.
            beta: the target's KL coefficient (``composition.beta``): ``lam_i = w_i beta_i / beta``; needed
                when the base models' betas differ.
            num_images_per_prompt: images per prompt; the images come prompt-major.
            generator: a CPU ``torch.Generator`` for the initial latents (unless ``latents`` is given) and
                then every step's noise (noise is drawn on the CPU, so a seed gives the same images on any
                device).
            latents: the initial latents ``[N, C, H, W]`` instead of drawing them.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return an :class:`MSDDAPipelineOutput`, else ``(images, nfe, reward_calls)``.
            callback_on_step_end: ``callback(pipe, step, timestep, {"latents": x})`` after each denoising
                step (for ``code``, x stacks the N candidate chains); it observes the chain: latents it
                returns are not used, and returning other ones is an error.
            callback_on_step_end_tensor_inputs: only ``["latents"]``.
            rewards: for ``code`` and ``rgg``: one reward per base model, in their order (a list, or a dict by
                name), each a reward name (``training.rewards.REWARDS``) or a ``training.rewards.Reward``;
                each is combined on its card's reward scale. The other methods call no rewards and ignore it.
            seed: instead of ``generator``: the seed of ``msdda compose --seed``; the initial latents and the
                step noise are drawn as :func:`composition.engine.generate` draws them for one batch, so the
                images are the ones it makes (``composition.batch_size`` at least the number of images).
            options: other ``composition`` settings for this call (``code_candidates``, ``code_block``,
                ``rgg_scale``, ``plan``, ``routed_weights``, ``compile``, ``path_kl``); default: the
                pipeline's :attr:`msdda_config`.
            num_inference_steps, eta, guidance_scale: the base models' cards set these; a value passed that
                differs from theirs is an error.

        Examples:

        Returns:
            :class:`MSDDAPipelineOutput` (``images``, ``nfe``, ``reward_calls``, ``path_kl``), or a tuple.
        """
        state = self._msdda
        # 1. Check the inputs: base models, method, weights, sampling settings, the call's options.
        if not state.models:
            raise CompositionError(
                "no base model is loaded: call pipe.load_base_model(folder_or_registry_spec) first"
            )
        chosen = get_method(method)
        if weights is None:
            raise CompositionError(f"pass weights=, one per base model in this order: {list(state.models)}")
        weights = parse_weights(weights, len(state.models))
        sampling = self._check_sampling(
            {"num_inference_steps": num_inference_steps, "eta": eta, "guidance_scale": guidance_scale}
        )
        self._check_scheduler()
        options = self._options(options, beta)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise CompositionError("prompt must be a string or a non-empty list of strings")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise CompositionError(
                f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt}"
            )
        if output_type not in OUTPUT_TYPES:
            raise CompositionError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise CompositionError("callback_on_step_end_tensor_inputs: only 'latents' is available")
        if seed is not None and generator is not None:
            raise CompositionError("pass seed or generator, not both")
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise CompositionError(
                "generator must be one CPU torch.Generator: noise is drawn on the CPU, so that a seed gives "
                "the same images on every device"
            )
        try:
            schedule_steps, schedule_eta = int(sampling["num_inference_steps"]), float(sampling["eta"])
            from training.step.kernel import DDIMSchedule

            schedule = DDIMSchedule.from_scheduler(self.scheduler, schedule_steps, schedule_eta)
        except ValueError as exc:
            raise CompositionError(f"the base models' sampling settings: {exc}") from None
        self._guidance_scale, self._num_timesteps, self._interrupt = (
            sampling["guidance_scale"],
            len(schedule),
            False,
        )

        # 2. The rewards a search calls, and the engine's view of the pipeline (scores, prompt states).
        rows = [p for p in prompts for _ in range(num_images_per_prompt)]
        unique = list(dict.fromkeys(rows))
        index = torch.tensor([unique.index(p) for p in rows])
        scored = chosen.score is not None
        ensemble = Ensemble(
            self,
            list(state.models.values()),
            self._rewards(rewards, method) if scored else {},
            schedule,
            float(sampling["guidance_scale"]),
            unique,
            state.reference_hash,
        )
        ensemble.check_scores(chosen)

        # 3. Encode the prompts (and the empty prompt).
        embeds, uncond = encode_prompts(self, unique)

        # 4. Prepare the initial latents and the step noise's generator.
        unet, device = self.unet, self.unet.device
        shape = (len(rows), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if seed is not None:
            x_seed, noise_seed = batch_seeds(seed, 0)
            generator = torch.Generator().manual_seed(noise_seed)
            x_T = draw_noise(shape, torch.Generator().manual_seed(x_seed))
        elif latents is None:
            x_T = draw_noise(shape, generator)
        else:
            if tuple(latents.shape) != shape:
                raise CompositionError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
            x_T = latents
        x_T = x_T.to(device=device, dtype=torch.float32)
        if scored:
            self._check_readable(ensemble, rows, x_T)

        # 5. The method's view: the UNet with the adapters, the schedule, guided and counted epsilons.
        forward = None
        if options.compile:
            state.compiled = state.compiled or compile_unet(unet)
            forward = state.compiled
        timesteps = schedule.timesteps

        with self.progress_bar(total=len(schedule)) as bar:

            def step_done(step: int, x: torch.Tensor) -> None:
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, step, int(timesteps[step]), {"latents": x})
                    if isinstance(out, dict) and out.get("latents", x) is not x:
                        raise CompositionError(
                            "callback_on_step_end returned other latents: a composed chain cannot take "
                            "them (the callback observes it)"
                        )
                bar.update()

            composer = _SteppedComposer(
                unet, schedule, ensemble.guidance_scale, ensemble.models, options, forward, on_step=step_done
            )
            prepare_composer(composer, chosen, method, weights)
            calls = RewardCalls()
            score = ensemble.method_score(chosen, weights, rows, calls, options.beta)

            # 6. Denoise: the method's kernel (or search) through the chain runner, one step at a time, then
            # decode; the one core that `composition.engine.generate` runs for each of its batches.
            decode = None if output_type == "latent" else partial(decode_latents, self.vae)
            batch = Batch(embeds[index], uncond)
            chain, nfe, images = sample_batch(composer, chosen, weights, x_T, batch, generator, score, decode)
            step_done(len(schedule) - 1, chain.latents.detach())
            bar.update(len(schedule) - bar.n)

        # 7. Post-process.
        if output_type == "latent":
            images = chain.latents
        else:
            images = self.image_processor.postprocess(
                images.cpu(), output_type=output_type, do_denormalize=[False] * len(images)
            )
        self.maybe_free_model_hooks()
        reward_calls = calls.count / len(rows)
        path_kl = None if chain.kl is None else chain.kl.detach().cpu()
        if not return_dict:
            return images, nfe, reward_calls
        return MSDDAPipelineOutput(images=images, nfe=nfe, reward_calls=reward_calls, path_kl=path_kl)
