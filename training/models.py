"""Loading the frozen reference model: the embedded default or any diffusers Stable Diffusion checkpoint."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from configs.errors import MsddaError, first_line
from configs.schema import PipelineConfig

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelLoadError(MsddaError, RuntimeError):
    """A saved model's or checkpoint's files are missing or unreadable (the message is one line)."""


class HomeError(MsddaError, ValueError):
    """``$MSDDA_HOME`` names something that cannot be the home folder (one line)."""


def msdda_home() -> Path:
    """Where caches, models and the default registry live: ``$MSDDA_HOME``, default ``./.msdda``. A path that
    exists but is not a folder raises :class:`HomeError`."""
    home = Path(os.environ.get("MSDDA_HOME", ".msdda")).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise HomeError(f"MSDDA_HOME={home} is a file, not a folder: set MSDDA_HOME to a folder")
    return home


def check_writable(folder: Path) -> Path:
    """Create ``folder`` (under ``$MSDDA_HOME``) if need be and write a file there, before work whose results
    land there: one the OS refuses (read-only, no permission, a path that cannot be created) raises
    :class:`HomeError` (one line) instead of failing after the work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise HomeError(
            f"cannot write to {folder} ({exc.strerror or first_line(exc)}): set MSDDA_HOME to a folder "
            f"you can write to"
        ) from None
    return folder


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "local files" if local.exists() else "the local hub cache (offline) or the hub"
        raise ModelLoadError(
            f"cannot load Stable Diffusion weights '{source}' from {where}: {first}"
        ) from None


def load_reference_pipeline(config: PipelineConfig, home: Path | None = None, progress: bool = True):
    """The reference ``StableDiffusionPipeline`` for ``config`` on ``config.runtime.device``, pretraining the
    embedded model if needed."""
    from training.device import resolve_device

    device = resolve_device(config.runtime.device)  # a missing device fails before any loading
    if config.model.source == "pretrained":
        return load_pretrained_pipeline(config.model.pretrained, config.model.revision).to(device)
    from training.embedded import load_embedded_pipeline, pretrain_reference

    result = pretrain_reference(config, home or msdda_home(), progress=progress)
    return load_embedded_pipeline(result.path).to(device)


def pretrained_identity(config: PipelineConfig) -> str:
    """How base models name a pretrained reference: the :func:`content_hash` of a local checkpoint folder,
    else ``<hub id>@<revision>``."""
    local = Path(config.model.pretrained).expanduser()
    return content_hash(local) if local.exists() else f"{config.model.pretrained}@{config.model.revision}"


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


def content_hash(directory: Path) -> str:
    """SHA-256 over every weight and config file of a saved pipeline (paths included), for lineage checks."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        if path.suffix not in {".safetensors", ".json", ".txt", ".bin"} or path.name.startswith("msdda_"):
            continue
        digest.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextmanager
def staged_directory(final: Path, prefix: str = ".build-", keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; when the block succeeds it replaces ``final`` by a rename,
    when it fails it is removed. Readers never see a half-written ``final``.

    With ``keep_existing`` (content-addressed caches, where ``final`` only ever appears complete): if
    ``final`` exists by then, a concurrent build of the same content won the race; it is kept, the staged
    one discarded.

    For folders a user names, which may hold the user's files, see
    :func:`composition.engine.staged_images`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from the rest of a team
        if keep_existing:
            try:
                tmp.rename(final)  # fails if a non-empty ``final`` appeared meanwhile
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
        if final.exists():
            final.rename(aside)  # a crash from here on leaves the old copy aside, never a half-written one
        try:
            tmp.rename(final)
        except BaseException:
            if aside.exists() and not final.exists():
                aside.rename(final)  # the old copy back in place
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block succeeds, the file written there replaces
    ``path`` by a rename, when it fails it is removed. Readers see the old file or the new one, never a
    half-written one; concurrent writers each have their own temporary file, and the last rename wins.

    The temporary name is hidden and ends in ``.tmp`` (what a killed process leaves is not taken for data,
    e.g. by :func:`content_hash`), so writers that pick a format by the extension must be told the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def raise_unless_content_fault(exc: BaseException, path: Path) -> None:
    """Return when ``exc``, raised reading the saved file at ``path``, shows that the file is damaged: it does
    not parse, is truncated or holds the wrong tensors (any exception but an ``OSError``), or it is not there.
    Anything else the OS says (permission denied, an I/O error, too many open files) tells nothing about the
    file, which must then be neither deleted nor rebuilt over: this raises :class:`ModelLoadError`, one line
    naming the file and the OS's reason."""
    if not isinstance(exc, OSError):
        return
    try:  # ask the OS: safetensors says "No such file or directory" of any file it cannot open
        Path(path).open("rb").close()
    except FileNotFoundError:
        return
    except OSError as refusal:
        exc = refusal
    raise ModelLoadError(
        f"cannot read {path} ({exc.strerror or first_line(exc)}); nothing was changed: "
        f"check its permissions and the disk, then rerun"
    ) from None
