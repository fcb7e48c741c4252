"""YAML loading that remembers where every value came from, and `${VAR}` expansion.

PyYAML's SafeLoader builds plain dicts and lists; we subclass its constructor so mappings and
sequences remember the line of each key / item. Validation errors then say
`gateway.yaml:12: routes[0].endpoints[1].argon.frame_duration_ms: expected one of 10, 20, 40, 60, got 25`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import yaml

from gateway.errors import ConfigError


class LineDict(dict):
    """A dict from YAML with `line` (1-based, of the mapping) and `key_lines[key]`."""

    line: int = 0
    key_lines: dict


class LineList(list):
    """A list from YAML with `line` and `item_lines[i]`."""

    line: int = 0
    item_lines: list


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(text: str, filename: str) -> Any:
    """Parse YAML text; raises ConfigError naming the file and line of a syntax error."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{filename}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, env: Mapping[str, str] | None = None) -> str:
    """Replace `${VAR}` (and `${VAR:-default}`) from the environment.

    Raises KeyError(var name) for an unset variable without a default; the caller turns it into
    a ConfigError naming the variable (never its value).
    """
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _VAR.sub(sub, value)
