"""Typed, located access to one YAML mapping: validation at the edge.

Every error names the file, the line and the dotted key path, and says what was expected:
`gateway.yaml:14: routes[0].endpoints[1].argon.frame_duration_ms: expected one of 10, 20, 40,
60, got 25`. Values that are secrets (`secret=True`) are never quoted back in an error, and
neither is anything a `${...}` reference gave (environment, file, credential): errors quote the
reference as written.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

from gateway.config.secret import Secret
from gateway.config.yaml_lines import LineDict, LineList, UnresolvedReference, expand, has_reference
from gateway.errors import ConfigError

_MISSING: Any = object()
SCRUB_MIN_CHARS = 4
"""`error()` replaces a referenced value of at least this many characters, wherever a message
quotes it, by its reference (shorter ones, like a port digit, are quoted by the getters)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_RULE = "use 1 to 64 of A-Z a-z 0-9 . _ -"
"""Route and endpoint names are identifiers: they go into log lines, metrics labels, URL paths
(`/v1/routes/{name}`) and HTTP headers (`Location`), so one rule keeps all of those safe."""


def is_name(text: str) -> bool:
    """True when `text` follows `NAME_RULE`, and is not "." or ".." (a path segment of its own)."""
    return bool(NAME_PATTERN.fullmatch(text)) and text not in (".", "..")


def shown(text: str, limit: int = 80) -> str:
    """`text` as repr() quotes it (control characters escaped), cut after `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


class Options:
    """One mapping of the config, consumed key by key; `finish()` rejects unknown keys."""

    def __init__(
        self,
        mapping: Mapping[str, Any] | None,
        *,
        filename: str = "<config>",
        path: str = "",
        line: int = 0,
        env: Mapping[str, str] | None = None,
        references: bool = True,
    ) -> None:
        if mapping is None:
            mapping = {}
        self.filename = filename
        self.path = path
        self.line = getattr(mapping, "line", 0) or line
        self.env = env
        self.references = references
        """False: a `${...}` reference is an error, not expanded (data from the control API must
        not read the daemon's environment, files or credentials)."""
        self._mapping = mapping
        self._used: set[str] = set()
        self._resolved: list[tuple[str, str]] = []
        """(reference, value) of every `${...}` this mapping expanded, for `error()`."""

    # -- errors ---------------------------------------------------------------------------
    def key_path(self, key: str | None = None) -> str:
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def line_of(self, key: str | None = None) -> int:
        lines = getattr(self._mapping, "key_lines", None) or {}
        return lines.get(key, self.line) if key is not None else self.line

    def error(self, key: str | None, message: str) -> ConfigError:
        """A ConfigError naming file, line and key path. A value that a `${...}` reference of this
        mapping gave is shown as the reference (callers may quote what `get_str` returned)."""
        for reference, value in self._resolved:
            if len(value) >= SCRUB_MIN_CHARS:
                message = message.replace(value, reference)
        line = self.line_of(key)
        where = f"{self.filename}:{line}" if line else self.filename
        return ConfigError(f"{where}: {self.key_path(key)}: {message}")

    # -- access ---------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._mapping

    def keys(self) -> Iterable[str]:
        return self._mapping.keys()

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._used.add(key)
        if key not in self._mapping or self._mapping[key] is None:
            if default is _MISSING:
                raise self.error(None, f"missing required key {key!r}")
            return default
        return self._mapping[key]

    def get_str(self, key: str, default: Any = _MISSING, *, secret: bool = False, allow_empty: bool = True) -> Any:
        """A string with its `${...}` references expanded (module `yaml_lines`). Numbers are
        accepted as text."""
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        text = self._expand(key, str(value))
        if not allow_empty and not text:
            raise self.error(key, "expected a non-empty string" + ("" if secret else ", got ''"))
        return text

    def get_str_list(self, key: str, *, secret: bool = False, allow_empty: bool = False) -> tuple[str, ...]:
        """The list of strings at `key` (() when absent), each expanded like `get_str`; an
        error names the item (`services.agent.cors_origins[1]: expected a string`)."""
        values = []
        for i, value, line in self.items(key):
            item = f"{key}[{i}]"  # errors name `services.agent.cors_origins[1]`
            values.append(self.child({item: value}, self.path, line).get_str(item, secret=secret, allow_empty=allow_empty))
        return tuple(values)

    def get_secrets(self, key: str, default: tuple[Secret, ...] = ()) -> tuple[Secret, ...]:
        """The list of secrets at `key` (tokens, API keys), empty items left out; `default`
        when the list is absent or empty. The listen roles' idiom: `listen_tokens` defaults to
        the dial token, `opts.get_secrets("listen_tokens", (token,) if token else ())`."""
        values = self.get_str_list(key, secret=True, allow_empty=True)
        return tuple(Secret(v) for v in values if v) or default

    def get_name(self, key: str, default: Any = _MISSING, *, what: str = "name") -> Any:
        """A route or endpoint name (`NAME_RULE`); the error quotes it with repr(), so no control
        character of it reaches a log line or an HTTP answer."""
        value = self.get_str(key, default, allow_empty=False)
        if value is default and default is not _MISSING:
            return value
        if not is_name(value):
            rule = NAME_RULE if value not in (".", "..") else f"{NAME_RULE}, not . or .. alone"
            raise self.error(key, f"{shown(value)} is not a valid {what}: {rule}")
        return value

    def get_int(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        choices: Iterable[int] | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        shown = str(value)
        if isinstance(value, str):
            text = self._expand(key, value)
            shown = value if has_reference(value) else text
            try:
                value = int(text)
            except ValueError:
                raise self.error(key, f"expected an integer, got {shown!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_kind(value)}")
        if choices is not None and value not in tuple(choices):
            raise self.error(key, f"expected one of {', '.join(map(str, choices))}, got {shown}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected at least {minimum}, got {shown}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"expected at most {maximum}, got {shown}")
        return value

    def get_float(self, key: str, default: Any = _MISSING, *, minimum: float | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected at least {minimum}, got {value}")
        return float(value)

    def get_bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if isinstance(value, str):
            lowered = self._expand(key, value).strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def get_choice(self, key: str, choices: Iterable[str], default: Any = _MISSING) -> Any:
        choices = tuple(choices)
        value = self.get_str(key, default)
        if value not in choices:
            raw = self._mapping.get(key)
            shown = raw if isinstance(raw, str) and has_reference(raw) else value
            raise self.error(key, f"expected one of {', '.join(choices)}, got {shown!r}")
        return value

    def _expand(self, key: str, text: str) -> str:
        """`text` with its references expanded; a relative `${file:}` path is relative to the
        config file's directory."""
        if not self.references and has_reference(text):
            raise self.error(key, "${...} references are not expanded here (a route added through the control API "
                             "cannot read the gateway's environment, files or credentials; secrets belong in services)")
        try:
            expanded, resolved = expand(text, self.env, os.path.dirname(self.filename))
        except UnresolvedReference as err:
            raise self.error(key, str(err)) from None
        self._resolved.extend(resolved)
        return expanded

    def sub(self, key: str, *, required: bool = False) -> Options:
        """The nested mapping at `key` (an empty one when absent and not required)."""
        value = self.raw(key, _MISSING if required else None)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a mapping, got {_kind(value)}")
        return Options(value, filename=self.filename, path=self.key_path(key), line=self.line_of(key), env=self.env,
                       references=self.references)

    def items(self, key: str, *, required: bool = False) -> list[tuple[int, Any, int]]:
        """(index, item, line) for the list at `key`."""
        value = self.raw(key, _MISSING if required else None)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        lines = getattr(value, "item_lines", None) or [self.line_of(key)] * len(value)
        return [(i, item, lines[i]) for i, item in enumerate(value)]

    def child(self, mapping: Any, path: str, line: int) -> Options:
        if not isinstance(mapping, Mapping):
            where = f"{self.filename}:{line}" if line else self.filename
            raise ConfigError(f"{where}: {path}: expected a mapping, got {_kind(mapping)}")
        return Options(mapping, filename=self.filename, path=path, line=line, env=self.env,
                       references=self.references)

    def finish(self) -> None:
        """Raise for the first key that nothing consumed (a typo, usually)."""
        for key in self._mapping:
            if key not in self._used:
                raise self.error(key, "unknown key")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._mapping)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (LineDict, dict)):
        return "a mapping"
    if isinstance(value, (LineList, list)):
        return "a list"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    return f"{type(value).__name__} {value!r}"
