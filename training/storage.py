"""Where results live and how they are written: the home folder (``$MSDDA_HOME``), content hashes, and writes
through a temporary file or folder plus a rename, so that nothing is ever seen half-written."""

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
