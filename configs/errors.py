"""The one base class of every user-facing error.

An :class:`MsddaError`'s message is one line that says what is wrong and, where it can, what to do. The CLI
prints it and exits with code 2; the Prefect tasks never retry it (see ``flows.retries``).
"""

from __future__ import annotations


class MsddaError(Exception):
    """Bad input or a broken artefact, reported as one line (config, reward, model, card, registry,
    composition)."""


class ConfigError(MsddaError, ValueError):
    """A config file is missing, is not YAML, or does not match the schema."""


TOO_DEEP = "nested too deeply to read (a config is a few levels of sections and lists)"
"""The error for YAML nested deeper than Python's recursion limit lets it be read."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, or its type's name when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
