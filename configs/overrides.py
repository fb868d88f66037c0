"""Command-line overrides of a config: ``--set section.field=value``.

An override names a field by its dotted path through the config's mappings (``train.iterations``,
``model.embedded.image_size``, ``objectives``) and gives its value as a YAML scalar or flow collection
(``3``, ``1e-3``, ``true``, ``[msdda, rs]``, ``{name: ink_economy, beta: 0.05}``; an empty value is ``null``).
Overrides apply in order on top of the YAML data, and the result is validated by the same schema as a file
(:func:`configs.schema.parse_config`), which names the override an error comes from.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from configs.errors import TOO_DEEP, ConfigError, first_line


class OverrideError(ConfigError):
    """A ``--set`` that is not ``section.field=value``, or whose value is not YAML (one line)."""


@dataclass(frozen=True)
class Override:
    text: str
    """As given: ``train.iterations=3``."""
    path: tuple[str, ...]
    value: object


def parse_override(text: str) -> Override:
    """``"train.iterations=3"`` -> ``Override(path=("train", "iterations"), value=3)``."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise OverrideError(f"--set {text}: expected section.field=value (no '=')")
    path = tuple(part.strip() for part in key.split("."))
    if not all(path):
        raise OverrideError(f"--set {text}: expected section.field=value (empty field name in {key!r})")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise OverrideError(f"--set {text}: the value is not YAML ({first_line(exc)})") from None
    except RecursionError:
        raise OverrideError(f"--set {key}=...: the value is {TOO_DEEP}") from None
    return Override(text, path, value)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of the config mapping ``data`` with every override applied in order (``data`` is not changed).
    Missing sections are created; a path through a value that is not a mapping is an :class:`OverrideError`.
    Field names and values are checked later, by the schema."""
    result = copy.deepcopy(data)
    for override in map(parse_override, overrides):
        node = result
        for depth, part in enumerate(override.path[:-1]):
            child = node.setdefault(part, {})
            if child is None:  # `section:` left empty in YAML
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(override.path[: depth + 1])
                raise OverrideError(f"--set {override.text}: {where} is not a section")
            node = child
        node[override.path[-1]] = override.value
    return result


def source_of(loc: Sequence[object], overrides: Sequence[str], default: str) -> str:
    """Where the field at ``loc`` (a validation error's location) was set: ``--set TEXT`` for the last
    override whose path is a prefix of ``loc`` or has ``loc`` as its prefix, else ``default`` (the file)."""
    located = tuple(str(part) for part in loc)
    if not located:  # an error of the config as a whole
        return default
    for override in reversed([parse_override(text) for text in overrides]):
        shared = min(len(located), len(override.path))
        if located[:shared] == override.path[:shared]:
            return f"--set {override.text}"
    return default
