"""Stable Diffusion checkpoints in diffusers' format, from a local folder or a hub id: checking one without
loading it, loading it with one-line errors, and the identity base models record for it."""

from __future__ import annotations

from pathlib import Path

from configs.errors import first_line
from configs.schema import PipelineConfig
from training.storage import ModelLoadError, content_hash

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _missing_components(directory: Path) -> list[str]:
    """SD components whose folder, config or weights are absent from a local pipeline directory."""
    missing = []
    if not (directory / "model_index.json").exists():
        missing.append("model_index.json")
    for name in SD_COMPONENTS:
        folder = directory / name
        if not folder.is_dir():
            missing.append(f"{name}/")
        elif name in ("unet", "vae", "text_encoder"):
            if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
                missing.append(f"{name}/ weights")
            if not (folder / "config.json").exists():
                missing.append(f"{name}/config.json")
    return missing


def check_checkpoint(source: str) -> None:
    """Without loading anything: a local checkpoint folder that is missing, or lacks a component's config or
    weights, raises :class:`ModelLoadError` (one line); so does a path-like ``source`` that does not exist.
    A hub id passes (whether it loads is up to the hub cache)."""
    local = Path(source).expanduser()
    if local.exists():
        missing = _missing_components(local)
        if missing:
            raise ModelLoadError(f"Stable Diffusion checkpoint at {local} is missing: {', '.join(missing)}")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(f"no Stable Diffusion checkpoint at {source}: the directory does not exist")


def load_pretrained_pipeline(source: str, revision: str | None = None, torch_dtype=None):
    """``StableDiffusionPipeline.from_pretrained`` from a local directory or a hub id, with one-line
    errors."""
    from diffusers import StableDiffusionPipeline

    check_checkpoint(source)
    local = Path(source).expanduser()
    kwargs = {"safety_checker": None, "requires_safety_checker": False, "revision": revision}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        return StableDiffusionPipeline.from_pretrained(str(local) if local.exists() else source, **kwargs)
    except (OSError, ValueError) as exc:
        where = "local files" if local.exists() else "the local hub cache (offline) or the hub"
        raise ModelLoadError(
            f"cannot load Stable Diffusion weights '{source}' from {where}: {first_line(exc)}"
        ) from None


def pretrained_identity(config: PipelineConfig) -> str:
    """How base models name a pretrained reference: the :func:`content_hash` of a local checkpoint folder,
    else ``<hub id>@<revision>``."""
    local = Path(config.model.pretrained).expanduser()
    return content_hash(local) if local.exists() else f"{config.model.pretrained}@{config.model.revision}"
