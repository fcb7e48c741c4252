"""What the VideoSDK dial and listen endpoints and the webhook endpoint share: the logger,
config readers for topics and lists (checked against the spec's topic rule, spec:
/work/shared/protocols/004_c69f0f37162481c1.txt, Messaging), the ``{"dtmf": "5"}`` message
extension, and VideoSDK's ``{"message"}`` answer for a refused HTTP body."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Mapping

from gateway.adapters.videosdk.frames import IngestClient
from gateway.adapters.videosdk.sessions import error_body
from gateway.codecs.dtmf import dtmf_key
from gateway.config.options import Options
from gateway.errors import ConfigError, LocalProtocolError
from gateway.server import HttpResponse

GOODBYE_SEND_S = 0.5  # seconds for the stop / meeting-left frame before the close handshake
DEFAULT_PUBLISH_EVENTS = ("dtmf",)

log = logging.getLogger("gateway.endpoint.videosdk")


def _iso_now() -> str:
    """UTC wall-clock time as JavaScript's toISOString writes it: 2026-06-27T14:41:00.000Z
    (message content, not timing: the media clock is trio's)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _topic_problem(topic: Any) -> str | None:
    """Why `topic` breaks the spec's topic rule ("a non-empty string up to 128 characters"),
    or None; the frames layer's own check (`frames.IngestClient.subscribe`), through its public API."""
    probe = IngestClient()
    probe.start()
    try:
        probe.subscribe(topic)
    except LocalProtocolError as err:
        return str(err)
    return None


def _dtmf_of(value: Any, log: logging.LoggerAdapter) -> str | None:
    """The key a pub/sub message ``{"dtmf": "5"}`` names (the object, or its JSON text as a
    dial side receives it), raised as a ``dtmf`` route event besides the ``message`` one (a
    gateway extension: the spec defines no DTMF message); None for any other message. A
    ``dtmf`` field that is not one DTMF key (0-9, *, #, A-D) is logged and ignored."""
    if isinstance(value, str):
        if '"dtmf"' not in value or not value.lstrip().startswith("{"):
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    if not isinstance(value, dict) or "dtmf" not in value:
        return None
    key = dtmf_key(value["dtmf"])
    if key is None:
        log.warning("ignoring the dtmf message: %r is not a DTMF key (0-9, *, #, A-D)", _shown(str(value["dtmf"]), 20))
    return key


def _shown(value: str, limit: int = 40) -> str:
    return ascii(value[:limit]) + ("..." if len(value) > limit else "")


def _config_topic(opts: Options, key: str) -> str | None:
    topic = opts.get_str(key, None)
    if topic is None:
        return None
    problem = _topic_problem(topic)
    if problem:
        raise opts.error(key, f"not a VideoSDK topic: {problem} (spec: Messaging, topic rules)")
    return topic


def _config_list(opts: Options, key: str, *, topics: bool = False) -> tuple[str, ...] | None:
    """A list of non-empty strings at `key` (None when absent); `topics` checks each against
    the spec's topic rule. Errors name the item: `...subscribe[1]: topic is empty`."""
    if opts.raw(key, None) is None:
        return None
    values = []
    for i, item, line in opts.items(key):
        where = f"{opts.filename}:{line}: {opts.key_path(key)}[{i}]"
        if isinstance(item, bool) or not isinstance(item, (str, int, float)) or not str(item):
            raise ConfigError(f"{where}: expected a non-empty string")
        text = str(item)
        if topics:
            problem = _topic_problem(text)
            if problem:
                raise ConfigError(f"{where}: not a VideoSDK topic: {problem}")
        values.append(text)
    return tuple(values)


def _config_mapping(opts: Options, key: str) -> dict[str, Any] | None:
    """A YAML mapping as plain JSON data (for participant / agent metadata)."""
    value = opts.raw(key, None)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise opts.error(key, "expected a mapping")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        raise opts.error(key, "expected JSON data (strings, numbers, booleans, lists, mappings)") from None


def _refused(status: int, cause: str) -> HttpResponse:
    """A body refused before its handler ran (gateway.server: 413 too big, 400 nested too deep),
    as VideoSDK answers: {"message": cause}."""
    return HttpResponse(status, error_body(cause))
