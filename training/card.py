"""The base-model card: one typed description of a saved single-objective LoRA base model, and its folder
format.

A base-model folder (format 2) holds

* ``base_model.json`` (:data:`CARD_FILE`): the :class:`BaseModelCard` (objective, reward, beta, trainer
  settings, LoRA rank/alpha/targets, the reference model's content hash, the scheduler and sampling config,
  metrics);
* ``pytorch_lora_weights.safetensors`` (:data:`LORA_FILE`): the UNet LoRA in diffusers' format (peft keys
  prefixed ``unet.``, the ``LoraConfig`` arguments in the file's ``lora_adapter_metadata``), so that
  ``StableDiffusionPipeline.load_lora_weights(folder)`` loads it onto the reference pipeline as is;
* ``variance.safetensors`` (:data:`VARIANCE_FILE`, when a variance was learned): ``{"log_variance": [S, C]}``.

The card records the SHA-256 of each weights file (``weights_sha256``), checked on every load, so a damaged or
altered file is refused even when it still parses; cards written before it (no hashes) are checked by parsing.
A file the OS cannot read now (permission denied, an I/O error) is not damage: it raises
:class:`training.storage.ModelLoadError` instead (:func:`training.storage.raise_unless_content_fault`).

Format 1 folders (``adapter_model.safetensors`` with unprefixed peft keys, a card without ``format_version``)
are still read. Everything is read with safetensors (never pickle); every problem with the content is a
one-line :class:`CardError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from configs.errors import MsddaError, first_line
from configs.schema import LORA_TARGET_SETS
from training.storage import raise_unless_content_fault, staged_directory

CARD_FILE = "base_model.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers LoRA format: keys "unet.<peft key>"
VARIANCE_FILE = "variance.safetensors"  # {"log_variance": [S, C]}
LEGACY_LORA_FILE = "adapter_model.safetensors"  # format 1: peft keys without prefix
FORMAT_VERSION = 2
LORA_TARGETS = list(LORA_TARGET_SETS["attention"])  # what cards from before ``train.lora_targets`` adapt
UNET_PREFIX = "unet."


class CardError(MsddaError, ValueError):
    """A base-model folder or card that is missing, corrupt, invalid or not composable, as one line."""


class NewerFormatError(CardError):
    """A base-model folder written by a newer msdda: sound, but not readable by this code."""


class DamagedModelError(CardError):
    """A base-model folder whose files are missing or damaged (:func:`_broken`)."""

    problem: str = ""
    """What is wrong, without the remedy (retraining it) that the message adds."""


# --------------------------------------------------------------------------------------------------- the card


class LoraSpec(BaseModel):
    """The LoRA adapter's shape: ``rank``, ``alpha`` (``None`` means ``alpha = rank``) and the target
    modules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: Annotated[int, Field(ge=1)]
    alpha: Annotated[float, Field(gt=0)] | None = None
    targets: Annotated[list[str], Field(min_length=1)]
    target_set: str = "attention"
    """The :data:`LORA_TARGET_SETS` name ``targets`` came from, or ``"custom"`` for an explicit list (cards
    written before ``train.lora_targets`` adapted the attention projections)."""
    modules: list[str] = []
    """The UNet modules ``targets`` resolved to when the model was trained (empty in older cards)."""

    @property
    def scaling(self) -> float:
        """The factor peft multiplies ``B @ A`` by: ``alpha / rank``."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def lora_config_kwargs(self) -> dict[str, Any]:
        """The arguments of the equivalent ``peft.LoraConfig`` (also stored in the weights file's
        metadata)."""
        return {
            "r": self.rank,
            "lora_alpha": self.rank if self.alpha is None else self.alpha,
            "target_modules": list(self.targets),
        }

    @classmethod
    def resolve(cls, unet, targets: str | Sequence[str], rank: int, alpha: float | None = None) -> LoraSpec:
        """The spec of a fresh LoRA on ``unet`` for ``train.lora_targets``: a :data:`LORA_TARGET_SETS` name
        (those of its names that ``unet`` has) or an explicit list of module names (each must name a layer).
        Raises :class:`LoraTargetError` naming the valid names."""
        layers = adaptable_modules(unet)
        if isinstance(targets, str):
            if targets not in LORA_TARGET_SETS:
                raise LoraTargetError(f"unknown LoRA target set {targets!r}; {_valid_targets(layers)}")
            target_set, wanted = targets, list(LORA_TARGET_SETS[targets])
        else:
            wanted = list(targets)
            target_set = next((k for k, v in LORA_TARGET_SETS.items() if list(v) == wanted), "custom")
        matched = {name: [m for m in layers if _adapts(m, name)] for name in wanted}
        absent = [name for name, modules in matched.items() if not modules]
        if absent and (target_set == "custom" or len(absent) == len(wanted)):
            what = f"{absent[0]!r} names" if target_set == "custom" else f"target set {target_set!r} matches"
            raise LoraTargetError(
                f"LoRA {what} no linear or convolution layer of this UNet; {_valid_targets(layers)}"
            )
        modules = {m for found in matched.values() for m in found}
        return cls(
            rank=rank,
            alpha=alpha,
            targets=[name for name in wanted if matched[name]],
            target_set=target_set,
            modules=[m for m in layers if m in modules],
        )


class LoraTargetError(MsddaError, ValueError):
    """``train.lora_targets`` names a set or module the UNet lacks, or a card adapts a module it lacks."""


def _adapts(module: str, target: str) -> bool:
    """peft's ``target_modules`` rule: the module's name is the target or ends with ``.<target>``."""
    return module == target or module.endswith("." + target)


_CONTAINER = re.compile(
    r"^(?:.*\.(?:attn\d+|resnets\.\d+|transformer_blocks\.\d+|attentions\.\d+|downsamplers\.\d+"
    r"|upsamplers\.\d+|time_embedding|add_embedding)\.)?(?P<short>.+)$"
)


def adaptable_modules(unet) -> dict[str, str]:
    """The linear and 2-D convolution layers of ``unet`` a LoRA can adapt, in module order: full name -> short
    name (the part after its block, e.g. ``to_q``, ``conv1``, ``ff.net.0.proj``). LoRA layers already on
    ``unet`` count as the layer they wrap."""
    from torch import nn

    layers = {}
    for name, module in unet.named_modules():
        name = name.removesuffix(".base_layer")
        if type(module) in (nn.Linear, nn.Conv2d) and ".lora_" not in name:
            layers[name] = _CONTAINER.match(name).group("short")
    return layers


def _valid_targets(layers: dict[str, str]) -> str:
    shorts = sorted(set(layers.values()), key=lambda s: (s.count("."), s))
    return f"the sets are {', '.join(LORA_TARGET_SETS)}; the module names are {', '.join(shorts)}"


def check_adapted_modules(unet, card: BaseModelCard) -> None:
    """Refuse, in one line, a base model whose card adapts modules that ``unet`` (the reference) lacks."""
    layers = adaptable_modules(unet)
    missing = [m for m in card.lora.modules if m not in layers]
    if missing:
        raise LoraTargetError(
            f"base model '{card.objective}' adapts {len(missing)} module(s) this reference lacks, such as "
            f"{missing[0]!r}: it was trained on another reference architecture"
        )


class RewardSpec(BaseModel):
    """The reward a base model was trained on; extra keys are the reward's own info (model, weights, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    options: dict = {}
    differentiable: bool = False


class RewardScale(BaseModel):
    """The scale a base model's reward is combined on: ``(R - offset) / scale``; the identity by default.

    Training writes the objective's ``scale`` (``objectives[].scale`` in the config: the reward is trained as
    ``R / scale``, :func:`~training.rewards.objective_reward`) and offset 0, so that composition scores
    (CoDe's selection, RGG's gradient) combine the objectives on the scale each model was trained on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    offset: float = 0.0
    scale: Annotated[float, Field(gt=0)] = 1.0

    def standardise(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(rewards - offset) / scale``."""
        return (rewards - self.offset) / self.scale


def scheduler_identity(scheduler: dict | None) -> dict:
    """A scheduler config without bookkeeping keys (``_diffusers_version`` and the like; ``_class_name``
    stays)."""
    return {k: v for k, v in (scheduler or {}).items() if not k.startswith("_") or k == "_class_name"}


class BaseModelCard(BaseModel):
    """Everything known about a base model except its weights: what it optimises, how, and on what
    reference."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)] = FORMAT_VERSION
    objective: Annotated[str, Field(min_length=1)]
    reward: RewardSpec
    reward_scale: RewardScale = RewardScale()
    beta: Annotated[float, Field(gt=0)]
    trainer: str
    train: dict = {}
    lora: LoraSpec
    learn_variance: str
    reference_hash: Annotated[str, Field(min_length=1)]
    reference: dict = {}
    scheduler: dict
    sampling: dict
    metrics: dict = {}
    history: list[dict] = []
    weights_sha256: dict[str, str] = {}
    """SHA-256 of each weights file by name (written by :func:`save_base_model`; empty in older cards)."""

    def lineage(self) -> dict:
        """What composable base models must share: the reference model and the scheduler config."""
        return {"reference_hash": self.reference_hash, "scheduler": scheduler_identity(self.scheduler)}

    def to_json(self) -> str:
        """The card as written to :data:`CARD_FILE` (values JSON cannot hold are written as strings)."""
        return self.model_dump_json(indent=2, fallback=str)

    @classmethod
    def read(cls, folder: str | Path) -> BaseModelCard:
        """The card in ``folder``; format 1 cards (no ``format_version``) are read as ``format_version=1``."""
        folder = Path(folder)
        path = folder / CARD_FILE
        if not path.is_file():
            raise _broken(folder, f"{CARD_FILE} is missing")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise_unless_content_fault(exc, path)
            raise _broken(folder, f"{CARD_FILE} is not valid JSON ({first_line(exc)})") from None
        if not isinstance(data, dict):
            raise _broken(folder, f"{CARD_FILE} holds a {type(data).__name__}, not an object")
        data.setdefault("format_version", 1)  # format 1 had no version field
        version = data["format_version"]
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise NewerFormatError(
                f"base model at {folder} has card format {version}, newer than this code reads "
                f"({FORMAT_VERSION}); update msdda"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _broken(
                folder, f"{CARD_FILE} is invalid ({_validation_message(exc)})", data.get("objective")
            ) from None


def _validation_message(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``field.path: message`` (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "card"
    more = f"; and {len(errors) - 1} more" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _broken(folder: Path, what: str, objective: object = None) -> DamagedModelError:
    """A :class:`DamagedModelError` for an unreadable folder, saying how to rebuild it."""
    name = objective if isinstance(objective, str) and objective else "<objective>"  # the card is unreadable
    problem = f"base model at {folder} is corrupt or incomplete: {what}"
    error = DamagedModelError(f"{problem}; retrain it with `msdda train --objective {name}`")
    error.problem = problem
    return error


# --------------------------------------------------------------------------------------------- loaded models


@dataclass(frozen=True)
class LoadedBaseModel:
    """A base model read from its folder: its card, LoRA weights (peft keys, no ``unet.`` prefix) and
    variance."""

    path: Path
    card: BaseModelCard
    lora: dict[str, torch.Tensor]
    log_variance: torch.Tensor | None

    @property
    def objective(self) -> str:
        return self.card.objective

    @property
    def beta(self) -> float:
        return self.card.beta

    @property
    def rank(self) -> int:
        return self.card.lora.rank

    @property
    def targets(self) -> list[str]:
        return list(self.card.lora.targets)


def _lora_problem(lora: dict[str, torch.Tensor], spec: LoraSpec) -> str | None:
    """What is wrong with LoRA weights for ``spec`` (empty, not finite, not peft keys, another rank), or
    ``None``."""
    if not lora:
        return "its LoRA weights are empty"
    for key, value in lora.items():
        module, sep, _ = key.partition(".lora_")
        if not sep:
            return f"LoRA key {key!r} is not a peft LoRA key (<module>.lora_A/lora_B.weight)"
        if not any(module == t or module.endswith("." + t) for t in spec.targets):
            return f"LoRA key {key!r} adapts a module outside the card's targets {spec.targets}"
        if ".lora_A." in key and value.ndim == 2 and value.shape[0] != spec.rank:
            return f"LoRA key {key!r} has rank {value.shape[0]}, the card says {spec.rank}"
        if not torch.isfinite(value).all():
            return f"LoRA weight {key!r} is not finite"
    return None


def _variance_problem(log_variance: torch.Tensor | None) -> str | None:
    """What is wrong with a log-variance offset (not ``[S, C]``, not finite), or ``None``."""
    if log_variance is None:
        return None
    if log_variance.ndim != 2:
        return f"log_variance has shape {list(log_variance.shape)}, expected [steps, channels]"
    if not torch.isfinite(log_variance).all():
        return "log_variance is not finite"
    return None


def _read_safetensors(folder: Path, name: str, objective: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder/name`` (safetensors only; never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / name
    if not path.is_file():
        raise _broken(folder, f"{name} is missing", objective)
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise_unless_content_fault(exc, path)
        raise _broken(
            folder, f"{name} is not a readable safetensors file ({first_line(exc)})", objective
        ) from None


def _sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_hash_problem(folder: Path, card: BaseModelCard) -> str | None:
    """Which weights file differs from the SHA-256 the card recorded for it, or ``None``."""
    for name, expected in card.weights_sha256.items():
        path = folder / name
        try:
            actual = _sha256(path)
        except OSError as exc:
            raise_unless_content_fault(exc, path)
            return f"{name} is missing"
        if actual != expected:
            return f"{name} does not match the SHA-256 recorded in its card (damaged or altered since saved)"
    return None


def load_base_model(folder: str | Path) -> LoadedBaseModel:
    """Read and check the base model in ``folder`` (format 2, or format 1 as written before the card)."""
    folder = Path(folder)
    card = BaseModelCard.read(folder)
    if card.format_version >= 2:
        stored = _read_safetensors(folder, LORA_FILE, card.objective)
        foreign = [k for k in stored if not k.startswith(UNET_PREFIX)]
        if foreign:
            raise _broken(
                folder, f"{LORA_FILE} holds non-UNet LoRA keys such as {foreign[0]!r}", card.objective
            )
        lora = {k.removeprefix(UNET_PREFIX): v for k, v in stored.items()}
    else:
        lora = _read_safetensors(folder, LEGACY_LORA_FILE, card.objective)
    log_variance = None
    if (folder / VARIANCE_FILE).exists() or card.learn_variance != "none":
        variance = _read_safetensors(folder, VARIANCE_FILE, card.objective)
        if "log_variance" not in variance:
            raise _broken(folder, f"{VARIANCE_FILE} has no 'log_variance'", card.objective)
        log_variance = variance["log_variance"]
    problem = (
        _lora_problem(lora, card.lora)
        or _variance_problem(log_variance)
        or _weights_hash_problem(folder, card)
    )
    if problem:
        raise _broken(folder, problem, card.objective)
    return LoadedBaseModel(folder, card, lora, log_variance)


def save_base_model(
    folder: str | Path,
    card: BaseModelCard,
    lora_state: dict[str, torch.Tensor],
    log_variance: torch.Tensor | None,
) -> Path:
    """Write a format-2 base-model folder (through a temporary folder and a rename); returns ``folder``.

    ``lora_state`` has peft keys without prefix (``get_peft_model_state_dict``'s); they are written with
    diffusers' own LoRA writer, prefixed ``unet.`` and with the ``LoraConfig`` arguments as adapter metadata.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import save_file

    folder = Path(folder)
    card = card.model_copy(update={"format_version": FORMAT_VERSION})
    lora = {k: v.detach().cpu().contiguous() for k, v in lora_state.items()}
    if log_variance is not None:
        log_variance = log_variance.detach().cpu().contiguous()
    problem = _lora_problem(lora, card.lora) or _variance_problem(log_variance)
    if problem:
        raise CardError(f"refusing to save the base model '{card.objective}' to {folder}: {problem}")
    with staged_directory(folder) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp,
            unet_lora_layers=lora,
            weight_name=LORA_FILE,
            unet_lora_adapter_metadata=card.lora.lora_config_kwargs(),
        )
        if log_variance is not None:
            save_file({"log_variance": log_variance}, tmp / VARIANCE_FILE)
        written = [name for name in (LORA_FILE, VARIANCE_FILE) if (tmp / name).exists()]
        hashes = {name: _sha256(tmp / name) for name in written}
        card = card.model_copy(update={"weights_sha256": hashes})
        (tmp / CARD_FILE).write_text(card.to_json())
    return folder


# ------------------------------------------------------------------------------------------------- lineage


def _short(value: object) -> str:
    return str(value)[:12]


def check_lineage(models: list[LoadedBaseModel], reference_hash: str | None = None) -> None:
    """Refuse base models that cannot be composed: trained on different reference models or scheduler configs,
    on another reference than ``reference_hash`` (when given), the same objective twice, or none at all."""
    if not models:
        raise CardError("no base models to compose")
    first = models[0]
    for other in models[1:]:
        pair = f"base models '{first.objective}' ({first.path}) and '{other.objective}' ({other.path})"
        if other.card.reference_hash != first.card.reference_hash:
            raise CardError(
                f"{pair} were trained on different reference models (reference_hash "
                f"{_short(first.card.reference_hash)} vs {_short(other.card.reference_hash)}): "
                f"they cannot be composed"
            )
        mine, theirs = first.card.lineage()["scheduler"], other.card.lineage()["scheduler"]
        if mine != theirs:
            keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise CardError(
                f"{pair} have different scheduler configs (differing: {', '.join(keys)}): "
                f"they cannot be composed"
            )
    if reference_hash is not None and first.card.reference_hash != reference_hash:
        raise CardError(
            f"base model '{first.objective}' ({first.path}) was trained on reference "
            f"{_short(first.card.reference_hash)}, but this config's reference is {_short(reference_hash)}"
        )
    seen: dict[str, LoadedBaseModel] = {}
    for model in models:
        if model.objective in seen:
            raise CardError(
                f"the objective '{model.objective}' appears twice among the base models "
                f"({seen[model.objective].path} and {model.path})"
            )
        seen[model.objective] = model
