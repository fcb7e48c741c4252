"""YAML loading that remembers where every value came from, and `${...}` references
(`${VAR}`, `${VAR:-default}`, `${file:PATH}`, `${credential:NAME}`).

PyYAML's SafeLoader builds plain dicts and lists; we subclass its constructor so mappings and
sequences remember the line of each key / item. Validation errors then say
`gateway.yaml:12: routes[0].endpoints[1].argon.frame_duration_ms: expected one of 10, 20, 40, 60, got 25`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

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


MAX_SECRET_FILE = 2**20  # 1 MiB: a token, a key or a PEM, never a data file

_REF = re.compile(r"\$\{(?:(file|credential):([^}]*)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")


class UnresolvedReference(LookupError):
    """A `${...}` reference that cannot be resolved. `str()` names the variable, file or
    credential and why (never a value); `reference` is the text as written in the YAML."""

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(message)
        self.reference = reference


def expand_env(value: str, env: Mapping[str, str] | None = None, base_dir: str = "") -> str:
    """Replace every reference in `value` by what it names:

    - `${VAR}` and `${VAR:-default}`: the environment (`env`, default `os.environ`);
    - `${file:PATH}`: the file's content, one trailing newline stripped; a relative PATH is
      relative to `base_dir` (the config file's directory);
    - `${credential:NAME}`: `$CREDENTIALS_DIRECTORY/NAME` (systemd `LoadCredential=`), the same
      way; `CREDENTIALS_DIRECTORY` is looked up in `env`.

    The result is not expanded again: a secret that holds `${...}` stays as it is. Raises
    UnresolvedReference naming what is missing; the caller adds file, line and key.
    """
    return expand(value, env, base_dir)[0]


def expand(value: str, env: Mapping[str, str] | None = None, base_dir: str = "") -> tuple[str, list[tuple[str, str]]]:
    """`expand_env`, and the (reference as written, value it gave) pairs, so an error message
    can show the reference instead of the value."""
    env = os.environ if env is None else env
    used: list[tuple[str, str]] = []

    def sub(m: re.Match[str]) -> str:
        resolved = _resolve(m, env, base_dir)
        used.append((m.group(0), resolved))
        return resolved

    return _REF.sub(sub, value), used


def unresolved_references(value: str, env: Mapping[str, str] | None = None, base_dir: str = "") -> list[UnresolvedReference]:
    """Every reference in `value` that `expand_env` cannot resolve (not just the first)."""
    env = os.environ if env is None else env
    missing = []
    for m in _REF.finditer(value):
        try:
            _resolve(m, env, base_dir)
        except UnresolvedReference as err:
            missing.append(err)
    return missing


def has_reference(value: str) -> bool:
    return _REF.search(value) is not None


def string_values(data: Any, path: str = "", line: int = 0) -> Iterator[tuple[str, int, str]]:
    """(dotted key path, line, text) of every string scalar under `data`, in file order."""
    if isinstance(data, dict):
        lines = getattr(data, "key_lines", None) or {}
        for key, value in data.items():
            yield from string_values(value, f"{path}.{key}" if path else str(key), lines.get(key, line))
    elif isinstance(data, list):
        lines = getattr(data, "item_lines", None) or [line] * len(data)
        for i, value in enumerate(data):
            yield from string_values(value, f"{path}[{i}]", lines[i])
    elif isinstance(data, str):
        yield path, line, data


def _resolve(m: re.Match[str], env: Mapping[str, str], base_dir: str) -> str:
    source, argument, name, default = m.groups()
    if name is not None:
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise UnresolvedReference(m.group(0), f"environment variable {name} is not set")
    if source == "file":
        if not argument:
            raise UnresolvedReference(m.group(0), "${file:PATH} needs a path")
        path = os.path.join(base_dir, argument)
        return _read_secret(m.group(0), path, f"file {path}")
    # credential
    if not argument or "/" in argument or argument in (".", ".."):
        raise UnresolvedReference(m.group(0), f"credential name {argument!r} must be a plain file name (LoadCredential=NAME:...)")
    directory = env.get("CREDENTIALS_DIRECTORY")
    hint = f"is LoadCredential={argument}:... in the unit?"
    if not directory:
        raise UnresolvedReference(m.group(0), f"credential {argument} not found (no $CREDENTIALS_DIRECTORY: {hint})")
    path = os.path.join(directory, argument)
    if not os.path.exists(path):
        raise UnresolvedReference(m.group(0), f"credential {argument} not found in $CREDENTIALS_DIRECTORY ({directory}): {hint}")
    return _read_secret(m.group(0), path, f"credential {argument} ({path})")


def _read_secret(reference: str, path: str, what: str) -> str:
    """The text of a secret file, one trailing newline (\\n or \\r\\n) stripped."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise UnresolvedReference(reference, f"{what}: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > MAX_SECRET_FILE:
        raise UnresolvedReference(reference, f"{what}: larger than {MAX_SECRET_FILE // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnresolvedReference(reference, f"{what}: not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def unresolved_in(data: Any, filename: str, env: Mapping[str, str] | None = None) -> list[tuple[str, UnresolvedReference]]:
    """(`file:line: key.path`, error) for every reference anywhere in the YAML `data` that cannot
    be resolved, in file order: `gateway check` reports them all at once, where validation
    stops at the first. Relative `${file:}` paths are relative to `filename`'s directory."""
    base_dir = os.path.dirname(filename)
    found = []
    for path, line, text in string_values(data):
        for err in unresolved_references(text, env, base_dir):
            found.append((f"{filename}:{line}: {path}" if line else f"{filename}: {path}", err))
    return found
