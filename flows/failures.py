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
Ctrl-C (``KeyboardInterrupt``)         130          ``Aborted!`` (as for a process killed by ``SIGINT``)
=====================================  ===========  ==========================================================

Operational failures are those an operator meets and can act on: a full or read-only disk, a permission, a
locked or corrupt SQLite store, a server that refuses or drops the connection, a corrupt weights file. A full
or read-only disk is found by its ``errno`` or, where a library keeps only the text (safetensors' Rust writer:
"No space left on device (os error 28)"; SQLite: "database or disk is full"), by its message. The full
traceback of every failure but bad input goes to a log file under ``$MSDDA_HOME/logs`` (the system's temporary
folder when the home cannot be written); ``msdda --verbose`` or ``MSDDA_DEBUG=1`` prints it inline instead.

Libraries log some failures with their traceback (MLflow's SQLAlchemy errors: about 90 lines).
:func:`console_without_tracebacks` shows such a record on the terminal as its message's first line and the
log file that holds the rest; records without a traceback (the libraries' INFO and WARNING lines) are
unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from configs.errors import MsddaError, first_line

DEBUG_VARIABLE = "MSDDA_DEBUG"

_FREE_SPACE = "free space on that disk (or set MSDDA_HOME to a folder on another), then run the command again"
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device", _FREE_SPACE),
    errno.EDQUOT: ("the disk quota is exceeded", _FREE_SPACE),
    errno.EROFS: (
        "the file system is read-only",
        "remount it writable (or set MSDDA_HOME to a writable folder), then run the command again",
    ),
    errno.EACCES: ("permission denied", "fix the permissions, then run the command again"),
    errno.EPERM: ("operation not permitted", "fix the permissions, then run the command again"),
}
"""What a failed write's ``errno`` says, and what to do about it."""

_DISK_TEXTS = {
    errno.ENOSPC: ("database or disk is full",),  # SQLite's SQLITE_FULL
}
"""Messages, besides the OS's own (``os.strerror``), that report a disk error without its ``errno``."""


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


def loaded_classes(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """Exception classes of ``module`` if it is already imported (else no instance of them can exist):
    optional dependencies are never imported just to classify an error."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name)) if loaded else ()


SQLITE_LOCKED = ("database is locked", "database table is locked")
"""Messages of a SQLite lock (MLflow's store under concurrent writers): it passes once the writer is gone."""


def is_sqlite_locked(exc: BaseException) -> bool:
    """Whether an error's message says that a SQLite database was locked by another writer."""
    return any(text in str(exc) for text in SQLITE_LOCKED)


def is_corrupt_sqlite(exc: BaseException) -> bool:
    """Whether a database error says its SQLite file is not an intact database."""
    text = str(exc)
    return "file is not a database" in text or "malformed" in text


def disk_errno(exc: BaseException) -> int | None:
    """The ``errno`` of a full, over-quota or read-only disk (or a refused permission, for an ``OSError``)
    that ``exc`` reports: an ``OSError``'s own, or one its message names, for libraries that keep only the
    text: Rust's "(os error 28)" (safetensors), the OS's "No space left on device", SQLite's "database or
    disk is full"."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        return exc.errno
    text = str(exc).lower()
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        named = (os.strerror(code).lower(), *_DISK_TEXTS.get(code, ()))
        if re.search(rf"\(os error {code}\)", text) or any(words in text for words in named):
            return code
    return None


def _describe_one(exc: BaseException) -> str | None:
    code = disk_errno(exc)
    if code is not None:
        what, remedy = DISK_ERRORS[code]
        where = f" at {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        return f"{what}{where} ({first_line(exc)}): {remedy}"
    database_errors = (
        sqlite3.DatabaseError,
        *loaded_classes("sqlalchemy.exc", "DatabaseError", "OperationalError"),
    )
    if isinstance(exc, database_errors):
        text = first_line(exc)
        if "locked" in text:
            return f"a SQLite store is locked by another process ({text}): run the command again when it ends"
        if is_corrupt_sqlite(exc):
            return f"a SQLite store is corrupt ({text}): move the file aside (nothing reads it again)"
    connection_errors = (
        ConnectionError,
        *loaded_classes("requests.exceptions", "ConnectionError"),
        *loaded_classes("httpx", "ConnectError", "RemoteProtocolError"),
        *loaded_classes("urllib3.exceptions", "MaxRetryError", "NewConnectionError"),
    )
    if isinstance(exc, connection_errors) and not isinstance(exc, BrokenPipeError):
        return f"a server could not be reached or went away ({first_line(exc)}): check that it is running"
    if isinstance(exc, loaded_classes("safetensors", "SafetensorError")) and "deserializ" in str(exc):
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
    from training.storage import msdda_home

    try:
        folder = msdda_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, MsddaError):  # a home that is a file, or cannot be written
        pass
    return Path(tempfile.gettempdir())


class _CommandLog:
    """The log file of the command running in this process: made at its first traceback (a library's logged
    one, :class:`_WithoutTraceback`, or the command's failure, :func:`write_traceback`), appended to after;
    ``None`` while it cannot be written (a full disk)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.lock = threading.Lock()

    def keep(self, text: str) -> Path | None:
        """Add ``text`` to the log; its path, ``None`` if it could not be written."""
        with self.lock:
            try:
                if self.path is None:
                    with tempfile.NamedTemporaryFile(
                        "w",
                        prefix=f"msdda-{time.strftime('%Y%m%d-%H%M%S')}-",
                        suffix=".log",
                        dir=log_folder(),
                        delete=False,
                    ) as handle:
                        handle.write(f"{text}\n")
                    self.path = Path(handle.name)
                else:
                    with open(self.path, "a") as handle:
                        handle.write(f"\n{text}\n")
            except OSError:
                return None
            return self.path


_log = _CommandLog()
_verbose = False
"""Whether the running command asked for tracebacks inline (``msdda --verbose``)."""


@contextlib.contextmanager
def command_logging(verbose: bool) -> Iterator[None]:
    """While a command runs: its tracebacks go to one log file of its own (:class:`_CommandLog`), or, with
    ``verbose``, stay inline as with ``MSDDA_DEBUG=1``."""
    global _verbose
    _verbose, _log.path = verbose, None
    try:
        yield
    finally:  # main() called again in one process (the tests): the next command starts afresh
        _verbose, _log.path = False, None


def write_traceback(exc: BaseException, argv: list[str]) -> Path | None:
    """The command line and ``exc``'s full traceback, in the command's log file; its path (``None`` if
    nothing could be written, e.g. on a full disk)."""
    return _log.keep(f"msdda {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc)).rstrip())


def close_progress_bars() -> bool:
    """Close the progress bars a failure left open, so that the error starts on a line of its own; whether
    there were any."""
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.close()
    return bool(bars)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does; a record with a traceback (or a stack) as its message's first
    line and the log file that keeps the record in full (on a copy: other handlers, Prefect's API among them,
    still get the whole record). ``MSDDA_DEBUG`` or ``--verbose``: unchanged."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info) or _verbose or debug_requested():
            return self.inner.format(record)
        log = _log.keep(self.inner.format(record))
        lines = record.getMessage().strip().splitlines()
        bare = copy.copy(record)
        bare.msg = (lines[0] if lines else "") + (f" (traceback: {log})" if log else "")
        bare.args, bare.exc_info, bare.exc_text, bare.stack_info = None, None, None, None
        return self.inner.format(bare)


def _writes_to_terminal(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to the process's stdout or stderr (not to a file or a buffer): Prefect's
    console, MLflow's handler (a stream that forwards to ``sys.stderr``), the libraries' stream handlers."""
    if type(handler).__name__ == "PrefectConsoleHandler":
        return True
    stream = getattr(handler, "stream", None)
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    if stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        return True
    if type(stream).__name__ == "MlflowLoggingStream":
        return True
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):  # a buffer, or closed
        return False


def console_without_tracebacks() -> None:
    """Every logging handler that writes to the terminal shows a record that carries a traceback as one line:
    its message's first line and the log file that holds the rest (:class:`_WithoutTraceback`). A command's
    failure is its own one line (:func:`report_failure`); MLflow, for one, logs a failed SQLAlchemy call with
    about 90 lines of traceback before it raises. Records without a traceback (INFO, WARNING lines) are
    unchanged. Call it once the libraries that add handlers are imported (MLflow, Prefect, diffusers)."""
    handlers = {
        handler
        for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]
        if isinstance(logger, logging.Logger)
        for handler in logger.handlers
    }
    if logging.lastResort is not None:  # what prints a record when no logger has a handler
        handlers.add(logging.lastResort)
    for handler in handlers:
        if _writes_to_terminal(handler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))


def report_failure(exc: BaseException, argv: list[str], verbose: bool = False) -> int:
    """Print ``exc`` as the table at the top of this module says; return the exit code."""
    bars = close_progress_bars()
    if isinstance(exc, KeyboardInterrupt):  # no traceback: the user stopped it
        # on a terminal the ^C it echoed ends no line (a closed progress bar ends its own)
        newline = "\n" if sys.stderr.isatty() and not bars else ""
        print(f"{newline}Aborted!", file=sys.stderr)
        return 130  # what a shell reports for a process killed by SIGINT
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
