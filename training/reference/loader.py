"""The frozen reference model of a config: the embedded default (pretrained here on first use, cached by its
key) or a Stable Diffusion checkpoint. Every ``model.source`` branch lives here."""

from __future__ import annotations

from pathlib import Path

from configs.schema import PipelineConfig
from training.reference.checkpoint import check_checkpoint, load_pretrained_pipeline, pretrained_identity
from training.reference.embedded import load_embedded_pipeline, pretrain_reference, result_dict
from training.storage import msdda_home


def reference_pipeline(config: PipelineConfig, home: Path | None = None, progress: bool = True):
    """``(pipeline, reference hash)`` of ``config``'s frozen reference, on the CPU: a pretrained checkpoint
    and its :func:`~training.reference.checkpoint.pretrained_identity`, or the embedded model (pretrained
    first if it is not cached) and its content hash."""
    if config.model.source == "pretrained":
        pipe = load_pretrained_pipeline(config.model.pretrained, config.model.revision)
        return pipe, pretrained_identity(config)
    reference = pretrain_reference(config, home or msdda_home(), progress=progress)
    return load_embedded_pipeline(reference.path), reference.reference_hash


def load_reference_pipeline(config: PipelineConfig, home: Path | None = None, progress: bool = True):
    """The reference ``StableDiffusionPipeline`` for ``config`` on ``config.runtime.device``, pretraining the
    embedded model if needed."""
    from training.device import resolve_device

    device = resolve_device(config.runtime.device)  # a missing device fails before any loading
    return reference_pipeline(config, home, progress)[0].to(device)


def check_reference(config: PipelineConfig, load: bool = False) -> None:
    """A ``model.source: pretrained`` checkpoint that is missing or incomplete (checked without loading
    anything), or with ``load`` one that does not load, raises :class:`~training.storage.ModelLoadError`
    (one line). The embedded model always passes: it is built, or read from the cache, where it is used."""
    if config.model.source != "pretrained":
        return
    check_checkpoint(config.model.pretrained)
    if load:
        load_reference_pipeline(config)


def prepare_reference(config: PipelineConfig, home: Path | None = None, progress: bool = True) -> dict:
    """What `msdda pretrain` and the ``pretrain-reference`` flow do: pretrain the embedded model if it is not
    cached, or load a pretrained checkpoint (training nothing), and describe the result as a dict with at
    least ``{"source", "path", "reference_hash", "trained"}`` (the embedded model's adds its quality figures,
    ``cached`` and ``key``)."""
    if config.model.source == "pretrained":
        return load_pretrained_reference(config)
    result = pretrain_reference(config, home or msdda_home(), progress=progress)
    return {"source": "embedded", **result_dict(result), "trained": not result.cached}


def load_pretrained_reference(config: PipelineConfig) -> dict:
    """For ``model.source: pretrained``, what `msdda pretrain` and the ``pretrain-reference`` flow do: load
    the checkpoint on ``config.runtime.device`` (a missing or broken one fails in one line) and describe it,
    training nothing. Returns ``{"source", "path", "revision", "reference_hash", "trained"}``."""
    load_reference_pipeline(config)
    local = Path(config.model.pretrained).expanduser()
    return {
        "source": "pretrained",
        "path": str(local.resolve()) if local.exists() else config.model.pretrained,
        "revision": config.model.revision,
        "reference_hash": pretrained_identity(config),
        "trained": False,
    }
