"""How a command that fails reports it: one line on stderr, never a traceback unless asked for.

=====================================  ===========  ==========================================================
failure                                exit code    what the user sees
=====================================  ===========  ==========================================================
:class:`~configs.errors.MsddaError`    2            ``error: <its message>``: bad input, a broken artefact,
                                                    or a failure msdda checks for itself (a corrupt store, a
                                                    server down or gone, the Prefect API)
an operational failure (below)         1            ``error: <what failed>: <remedy> (traceback: <log file>)``
anything else                          1            ``error: <Type>: <first line> (traceback: <log file>)``
stdout's reader gone (broken pipe)     141          nothing (as for a process killed by ``SIGPIPE``)
=====================================  ===========  ==========================================================

Operational failures are those an operator meets and can act on: a full or read-only disk, a permission, a
locked or corrupt SQLite store, a server that refuses or drops the connection, a corrupt weights file. The
full traceback of every failure but bad input goes to a log file under ``$MSDDA_HOME/logs`` (the system's
temporary folder when the home cannot be written); ``msdda --verbose`` or ``MSDDA_DEBUG=1`` prints it inline
instead.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from configs.errors import MsddaError, first_line

DEBUG_VARIABLE = "MSDDA_DEBUG"

DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def debug_requested() -> bool:
    """Whether ``MSDDA_DEBUG`` asks for tracebacks inline (any value but empty, ``0`` or ``false``)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """Exception classes of ``module`` if it is already imported (no instance can exist otherwise)."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name)) if loaded else ()


def is_corrupt_sqlite(exc: BaseException) -> bool:
    """Whether a database error says its SQLite file is not an intact database."""
    text = str(exc)
    return "file is not a database" in text or "malformed" in text


def _describe_one(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        where = f" at {exc.filename}" if exc.filename else ""
        return f"{DISK_ERRORS[exc.errno]}{where}: free space or fix the permissions, then run it again"
    database_errors = (sqlite3.DatabaseError, *_loaded("sqlalchemy.exc", "DatabaseError", "OperationalError"))
    if isinstance(exc, database_errors):
        text = first_line(exc)
        if "locked" in text:
            return f"a SQLite store is locked by another process ({text}): run the command again when it ends"
        if is_corrupt_sqlite(exc):
            return f"a SQLite store is corrupt ({text}): move the file aside (nothing reads it again)"
    connection_errors = (
        ConnectionError,
        *_loaded("requests.exceptions", "ConnectionError"),
        *_loaded("httpx", "ConnectError", "RemoteProtocolError"),
        *_loaded("urllib3.exceptions", "MaxRetryError", "NewConnectionError"),
    )
    if isinstance(exc, connection_errors) and not isinstance(exc, BrokenPipeError):
        return f"a server could not be reached or went away ({first_line(exc)}): check that it is running"
    if isinstance(exc, _loaded("safetensors_rust", "SafetensorError")):
        return f"a weights file is corrupt or truncated ({first_line(exc)})"
    return None


def describe_operational(exc: BaseException) -> str | None:
    """One line for an operational failure anywhere in ``exc``'s chain of causes, else ``None``."""
    for cause in causes(exc):
        message = _describe_one(cause)
        if message is not None:
            return message
    return None


def log_folder() -> Path:
    """``$MSDDA_HOME/logs`` when it can be written, else the system's temporary folder."""
    from training.models import msdda_home

    try:
        folder = msdda_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, MsddaError):  # a home that is a file, or cannot be written
        pass
    return Path(tempfile.gettempdir())


def write_traceback(exc: BaseException, argv: list[str]) -> Path | None:
    """The command line and ``exc``'s full traceback in a new log file; its path (``None`` if nothing could be
    written, e.g. on a full disk)."""
    text = f"msdda {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc))
    try:
        with tempfile.NamedTemporaryFile(
            "w",
            prefix=f"msdda-{time.strftime('%Y%m%d-%H%M%S')}-",
            suffix=".log",
            dir=log_folder(),
            delete=False,
        ) as handle:
            handle.write(text)
        return Path(handle.name)
    except OSError:
        return None


def close_progress_bars() -> None:
    """Close the progress bars a failure left open, so that the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, less its traceback (on a copy: other handlers still see it)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = copy.copy(record)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def prefect_console_without_tracebacks() -> None:
    """Prefect's console prints a failed flow or task run's message but not its traceback: the CLI's one line
    and its log file say the rest, and Prefect's API still stores the full log for its UI."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(
                handler.formatter, _WithoutTraceback
            ):
                handler.setFormatter(_WithoutTraceback(handler.formatter))


def report_failure(exc: BaseException, argv: list[str], verbose: bool = False) -> int:
    """Print ``exc`` as the table at the top of this module says; return the exit code."""
    close_progress_bars()
    if isinstance(exc, BrokenPipeError):  # stdout's reader went away (`msdda models | head`): no failure
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # what a shell reports for a process killed by SIGPIPE
    if isinstance(exc, MsddaError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verbose = verbose or debug_requested()
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    message = describe_operational(exc) or f"{type(exc).__name__}: {first_line(exc)}"
    log = None if verbose else write_traceback(exc, argv)
    print(f"error: {message}" + (f" (traceback: {log})" if log else ""), file=sys.stderr)
    return 1
