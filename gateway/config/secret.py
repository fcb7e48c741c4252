"""A value that must never be printed: tokens, API keys, JWT secrets."""

from __future__ import annotations

import hashlib

import attrs


@attrs.frozen(repr=False, eq=True)
class Secret:
    """Holds a secret string. `repr`/`str` print `Secret(***)`; `reveal()` gives the value.

    `fingerprint` is a short SHA-256 prefix, safe for logs and for keying per-token state
    (e.g. one StreamToken rate limiter per bot) without keeping the token in a dict key.
    """

    _value: str = attrs.field(alias="value")

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)
