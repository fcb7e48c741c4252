"""Argon bot voice ingress, sans-IO: Opus packet checks, ingress URL, stream JWT, StreamToken REST.

Source: /work/shared/protocols/000_1537bbe3858d175f.txt ("Voice Streaming": Step-by-Step Flow,
Connection Parameters, Audio Requirements, Room & Token Details, Prerequisites & Validation) and
001_bf359231651c17d3.txt (bots authenticate REST calls with ``Authorization: Bot <token>``).

The flow a bot follows (dial) and a compatible server answers (listen):

1. ``POST {api}/IVoice/v1/StreamToken`` with ``{"spaceId", "channelId"}`` (`STREAM_TOKEN_PATH`,
   `stream_token_request`) → ``{"token", "ingressUrl", "roomName"}``
   (`parse_stream_token_response`; the listen side answers with `stream_token_response` or
   `error_body`). Errors: 400 text channel, 403 not a member, 404 no channel, 5 requests/minute.
2. Open a WebSocket to ``{ingressUrl}?token=…&stereo=…&frame_duration_ms=…&track_name=…``
   (`build_ingress_url`; the listen side parses the request target with `parse_ingress_target`
   and checks the token with `verify_stream_token`).
3. Send one Opus packet (RFC 6716) per binary message, 48 kHz, 10/20/40/60 ms, mono or stereo as
   announced (`validate_opus_packet`).

The stream token is a LiveKit-style JWT (HS256, 2 h TTL, room ``{spaceId}/{channelId}``) with the
bot permissions the spec lists (publish, subscribe, data, update own metadata):
`issue_stream_token` / `verify_stream_token`. Both take `now` (seconds since the epoch)
explicitly; nothing here reads a clock.

Close codes (`RemoteProtocolError.close_code`, RFC 6455 §7.4.1): 1007 for any Opus packet the
ingress refuses; 1008 for a missing token in the ingress query; 1002 for a malformed or invalid
ingress query value. Text messages on the ingress are the adapter's to refuse (1003).

Argon's own server (/work/shared/protocols/argon-voice-ws.md, which the sections after the
StreamToken REST follow; where it and the seeds disagree the dial side follows the server and
the listen side accepts both):

4. Three paths on a bare base URL (`AudioPath`): /audio/connect publishes, /audio/subscribe
   hears one participant, /audio/duplex does both. `build_audio_url` (dial) and
   `parse_audio_request` (listen; refusals are `AudioRefusal` with an HTTP status, before the
   upgrade) read the query as the server does: lenient ``stereo`` / ``frame_duration_ms``,
   ``target_identity`` required to hear, token from ``Authorization: Bearer`` or ``?token=``.
5. Room tokens: `issue_room_token` / `verify_room_token` (LiveKit claims, HS256, 1 min leeway,
   `TokenError.status` 401 or 403 as the server classifies the cause).
6. JSON text messages from the server: `parse_status_message` / `status_message`
   (``{"status": "ready" | "waiting" | "subscribed" | "target_left" | "error", …}``, the older
   key ``type`` accepted).
7. Bot REST beyond StreamToken: Calls Accept / Reject (`CallGrant`, `CallsError`), GetMe
   (`BotSelf`) and Argon's error body `api_error_body`; the events stream's constants
   (`EVENTS_PATH`, `INTENT_VOICE`, `INTENT_CALLS`); its parser is `gateway.adapters.argon.sse`.

Secrets: no error message, `str()` or `repr()` produced here contains a bot token, a stream JWT
or a JWT secret (`IngressParams`, `StreamTokenGrant`, `AudioRequest` and `CallGrant` keep their
token out of `repr`; a refused REST call quotes the server's own cause only after replacing
anything token-like in it).
"""

from __future__ import annotations

import enum
import http
import json
import math
import re
import urllib.parse
from typing import Any

import attrs
import jwt

from gateway.adapters.rest import (
    body_retry_after,
    json_type,
    loads_strict,
    parse_retry_after,
    status_cause,
)
from gateway.errors import (
    CloseCode,
    GatewayError,
    LocalProtocolError,
    RemoteProtocolError,
    ServiceError,
)

__all__ = [
    "API_ERROR_CONTENT_TYPE",
    "AUDIO_PORT",
    "AudioPath",
    "AudioRefusal",
    "AudioRequest",
    "BotSelf",
    "BotSelfError",
    "CALLS_ACCEPT_PATH",
    "CALLS_RATE_PER_MINUTE",
    "CALLS_REJECT_PATH",
    "CALL_TOKEN_TTL_S",
    "CallGrant",
    "CallsError",
    "ERROR_CONTENT_TYPE",
    "EVENTS_CONNECTS_PER_MINUTE",
    "EVENTS_HEARTBEAT_S",
    "EVENTS_PATH",
    "EVENTS_RESUME_WINDOW_S",
    "FRAME_DURATIONS_MS",
    "GET_ME_PATH",
    "INTENT_CALLS",
    "INTENT_VOICE",
    "IngressParams",
    "MAX_CLIENT_MESSAGE_BYTES",
    "MAX_PACKET_DURATION_MS",
    "MAX_PUBLISH_PACKET_BYTES",
    "MAX_SUBSCRIBE_CLIENT_MESSAGE_BYTES",
    "MIN_PUBLISH_PACKET_BYTES",
    "OPUS_SILENCE_PACKET",
    "OpusMode",
    "OpusPacketInfo",
    "ROOM_TOKEN_LEEWAY_S",
    "RoomGrant",
    "SAMPLE_RATE",
    "STATUS_ERROR",
    "STATUS_READY",
    "STATUS_SUBSCRIBED",
    "STATUS_TARGET_LEFT",
    "STATUS_WAITING",
    "STREAM_TOKEN_PATH",
    "STREAM_TOKEN_RATE_PER_MINUTE",
    "STREAM_TOKEN_RATE_PER_MINUTE_SERVER",
    "STREAM_TOKEN_TTL_S",
    "StatusMessage",
    "StreamGrant",
    "StreamTokenError",
    "StreamTokenGrant",
    "TRACK_SOURCE_MICROPHONE",
    "TRACK_SOURCE_SCREEN_SHARE_AUDIO",
    "TokenError",
    "accept_request",
    "accept_response",
    "api_error_body",
    "api_error_cause",
    "build_audio_url",
    "build_ingress_url",
    "error_body",
    "get_me_response",
    "issue_room_token",
    "issue_stream_token",
    "parse_accept_response",
    "parse_audio_request",
    "parse_get_me_response",
    "parse_ingress_target",
    "parse_reject_response",
    "parse_retry_after",
    "parse_status_message",
    "parse_stream_token_response",
    "reject_request",
    "room_name",
    "status_message",
    "stream_token_request",
    "stream_token_response",
    "validate_opus_packet",
    "verify_room_token",
    "verify_stream_token",
]

SAMPLE_RATE = 48000  # Hz, the ingress's only rate (spec: "Audio Requirements")
FRAME_DURATIONS_MS = (10, 20, 40, 60)  # allowed frame_duration_ms values (spec: "Connection Parameters")
MAX_PACKET_DURATION_MS = 120  # ms of audio one Opus packet may hold (RFC 6716 §3.4 R5)
_MAX_FRAME_BYTES = 1275  # largest Opus frame (RFC 6716 §3.2.1, §3.4 R2)
_MIN_PACKET_BYTES = 3  # "Argon rejects packets of 2 bytes or less"


# --- Opus packets (RFC 6716 §3.1, §3.2, §3.4) ------------------------------------------------


class OpusMode(enum.Enum):
    """Coding mode selected by the TOC byte's config (RFC 6716 §3.1, Table 2)."""

    SILK = "silk"  #: SILK-only (speech, up to wideband)
    HYBRID = "hybrid"  #: SILK for the low band + CELT above 8 kHz
    CELT = "celt"  #: CELT-only (music, low delay)


# RFC 6716 §3.1, Table 2, literally: (first config, mode, bandwidth, frame sizes in ms).
_TABLE_2 = (
    (0, OpusMode.SILK, "NB", (10, 20, 40, 60)),
    (4, OpusMode.SILK, "MB", (10, 20, 40, 60)),
    (8, OpusMode.SILK, "WB", (10, 20, 40, 60)),
    (12, OpusMode.HYBRID, "SWB", (10, 20)),
    (14, OpusMode.HYBRID, "FB", (10, 20)),
    (16, OpusMode.CELT, "NB", (2.5, 5, 10, 20)),
    (20, OpusMode.CELT, "WB", (2.5, 5, 10, 20)),
    (24, OpusMode.CELT, "SWB", (2.5, 5, 10, 20)),
    (28, OpusMode.CELT, "FB", (2.5, 5, 10, 20)),
)
#: config (0..31) -> (mode, bandwidth, frame duration in ms)
_CONFIGS = tuple(
    (mode, bandwidth, float(ms)) for _first, mode, bandwidth, sizes in _TABLE_2 for ms in sizes
)


@attrs.frozen
class OpusPacketInfo:
    """What the TOC byte and the frame packing of one valid Opus packet say."""

    config: int
    """TOC config number, 0..31 (RFC 6716 §3.1, Table 2)."""
    mode: OpusMode
    """SILK, HYBRID or CELT, from `config`."""
    bandwidth: str
    """Audio bandwidth from `config`: "NB", "MB", "WB", "SWB" or "FB"."""
    frame_ms: float
    """Duration of each frame in milliseconds: 2.5, 5, 10, 20, 40 or 60."""
    frames: int
    """Number of frames in the packet (code 0: 1, codes 1 and 2: 2, code 3: M from 1 to 48)."""
    duration_ms: float
    """Total audio in the packet, `frames * frame_ms` milliseconds (at most 120)."""
    stereo: bool
    """TOC s bit: True for stereo, False for mono."""
    code: int
    """Frame-count code c from the TOC, 0..3 (RFC 6716 §3.2)."""
    frame_sizes: tuple[int, ...]
    """Compressed size of each frame in bytes (0 means DTX / lost frame)."""
    padding: int
    """Padding bytes at the end of a code 3 packet (0 otherwise)."""


def _reject(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, close_code=CloseCode.INVALID_PAYLOAD)


def _ms(value: float) -> str:
    return f"{value:g}"


def _frame_length(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Decode one §3.2.1 frame length at `pos`: (length, bytes used)."""
    if pos >= len(data):
        raise _reject(f"Opus packet truncated: no {what}")
    first = data[pos]
    if first < 252:
        return first, 1
    if pos + 1 >= len(data):
        raise _reject(f"Opus packet truncated: {what} needs a second byte")
    return 4 * data[pos + 1] + first, 2


def validate_opus_packet(
    packet: bytes | bytearray | memoryview,
    *,
    channels: int | None = None,
    frame_duration_ms: float | None = None,
) -> OpusPacketInfo:
    """Check one Opus packet the way the Argon ingress does and describe it.

    RFC 6716 §3.1 (TOC byte: config, s, c), §3.2 (frame packing codes 0-3, §3.2.1 frame length
    coding, §3.2.5 code 3 padding) and the §3.4 requirements R1-R7 are enforced, plus Argon's
    own rules: packets of 2 bytes or less are rejected; `channels` (1 or 2), when given, must
    match the TOC stereo flag; `frame_duration_ms`, when given, must equal the packet's total
    duration (a 40 ms packet on a 20 ms stream is refused even if it is valid Opus).

    Raises `RemoteProtocolError(close_code=1007)` whose message names the cause, e.g.
    "Opus packet 1 byte: too short", "TOC says stereo, stream is mono", "packet is 40 ms, stream
    is 20 ms", "code 3 frame count 0". Raises `LocalProtocolError` for a `channels` other than
    1, 2 or None.
    """
    if channels not in (None, 1, 2):
        raise LocalProtocolError(f"channels must be 1, 2 or None, got {channels!r}")
    data = bytes(packet)
    n = len(data)
    if n < _MIN_PACKET_BYTES:
        raise _reject(f"Opus packet {n} byte{'' if n == 1 else 's'}: too short")
    toc = data[0]
    config, stereo, code = toc >> 3, bool(toc & 0x04), toc & 0x03
    mode, bandwidth, frame_ms = _CONFIGS[config]
    padding = 0
    if code == 0:  # one frame, the rest of the packet
        sizes: tuple[int, ...] = (n - 1,)
    elif code == 1:  # two frames of equal size (R3)
        if (n - 1) % 2:
            raise _reject(f"code 1 packet has an odd payload ({n - 1} bytes) for two equal frames")
        sizes = ((n - 1) // 2,) * 2
    elif code == 2:  # two frames, the first length coded (R4)
        first, used = _frame_length(data, 1, "code 2 first frame length")
        second = n - 1 - used - first
        if second < 0:
            raise _reject(f"code 2 first frame {first} bytes, only {n - 1 - used} left")
        sizes = (first, second)
    else:  # code 3: frame count byte, optional padding, CBR or VBR (R5, R6, R7)
        sizes, padding = _code3(data, frame_ms)
    for size in sizes:
        if size > _MAX_FRAME_BYTES:  # R2
            raise _reject(f"Opus frame {size} bytes, limit {_MAX_FRAME_BYTES}")
    frames = len(sizes)
    duration = frames * frame_ms
    if channels is not None and stereo != (channels == 2):
        toc_says, stream_is = ("stereo", "mono") if stereo else ("mono", "stereo")
        raise _reject(f"TOC says {toc_says}, stream is {stream_is}")
    if frame_duration_ms is not None and not math.isclose(duration, frame_duration_ms):
        raise _reject(f"packet is {_ms(duration)} ms, stream is {_ms(frame_duration_ms)} ms")
    return OpusPacketInfo(
        config=config,
        mode=mode,
        bandwidth=bandwidth,
        frame_ms=frame_ms,
        frames=frames,
        duration_ms=duration,
        stereo=stereo,
        code=code,
        frame_sizes=sizes,
        padding=padding,
    )


def _code3(data: bytes, frame_ms: float) -> tuple[tuple[int, ...], int]:
    """Frame sizes and padding of a code 3 packet (RFC 6716 §3.2.5)."""
    n = len(data)
    header = data[1]  # n >= 3, so the frame count byte is present
    vbr, has_padding, count = bool(header & 0x80), bool(header & 0x40), header & 0x3F
    if count == 0:  # R5
        raise _reject("code 3 frame count 0")
    if count * frame_ms > MAX_PACKET_DURATION_MS:  # R5
        raise _reject(
            f"code 3 packet is {count} x {_ms(frame_ms)} ms, more than {MAX_PACKET_DURATION_MS} ms"
        )
    pos = 2
    padding = 0
    if has_padding:
        # Each 255 means 254 bytes of padding plus another length byte; the first other value
        # ends the padding length.
        run_end = n - len(data[pos:].lstrip(b"\xff"))
        if run_end >= n:
            raise _reject("Opus packet truncated: no end to the code 3 padding length")
        padding = 254 * (run_end - pos) + data[run_end]
        pos = run_end + 1
    available = n - pos - padding  # bytes left for frame lengths and frame data (R6, R7)
    if available < 0:
        raise _reject(f"code 3 padding {padding} bytes, only {n - pos} left")
    if not vbr:  # CBR: M frames of equal size (R6)
        if available % count:
            raise _reject(f"code 3 CBR payload {available} bytes does not split into {count} frames")
        return (available // count,) * count, padding
    sizes = []
    end = n - padding
    body = data[:end]  # frame lengths may not run into the padding
    for i in range(count - 1):  # VBR: M-1 coded lengths, the last frame takes the rest (R7)
        if pos >= end:
            raise _reject(f"Opus packet truncated: no length for code 3 frame {i + 1} of {count}")
        size, used = _frame_length(body, pos, f"length of code 3 frame {i + 1}")
        pos += used
        sizes.append(size)
    last = end - pos - sum(sizes)
    if last < 0:
        raise _reject(f"code 3 VBR frame lengths total {sum(sizes)} bytes, only {end - pos} left")
    sizes.append(last)
    return tuple(sizes), padding


# --- ingress URL and query ------------------------------------------------------------------


def _check_frame_duration(_instance: Any, _attribute: Any, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in FRAME_DURATIONS_MS:
        raise LocalProtocolError(f"frame_duration_ms must be one of {FRAME_DURATIONS_MS}, got {value!r}")


@attrs.frozen
class IngressParams:
    """The ingress WebSocket's query parameters (spec: "Connection Parameters")."""

    token: str = attrs.field(repr=False)
    """The stream JWT from StreamToken. Kept out of `repr`."""
    stereo: bool = False
    """True for 2 channels (``stereo=true`` or ``channels=2``), False for mono."""
    frame_duration_ms: int = attrs.field(default=20, validator=_check_frame_duration)
    """Opus frame duration in ms: 10, 20, 40 or 60; every packet must be this long."""
    track_name: str = ""
    """Display name of the audio track, visible to other participants."""
    track_source: str = ""
    """Track source type, e.g. "microphone", "screen_share_audio"."""
    metadata: str = ""
    """Arbitrary string attached to the track participant."""

    @property
    def channels(self) -> int:
        """2 when `stereo`, else 1."""
        return 2 if self.stereo else 1


#: URL scheme of an ingressUrl -> WebSocket scheme to open (http(s) is mapped to ws(s)).
_WS_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def build_ingress_url(ingress_url: str, ingress_path: str, params: IngressParams) -> str:
    """The WebSocket URL to open: ``{ingress_url}{ingress_path}?token=…&stereo=true|false&
    frame_duration_ms=…&track_name=…&track_source=…&metadata=…``.

    `ingress_url` is the StreamToken response's ``ingressUrl`` (with or without a trailing
    slash, possibly with a path or query of its own, kept; an http(s) scheme becomes ws(s);
    any other scheme raises `LocalProtocolError`); `ingress_path` is appended with
    exactly one slash between (pass "" for none, as in the spec's examples). Values are
    percent-encoded (RFC 3986; spaces as %20, not "+"); every parameter is always present.
    """
    try:
        parts = urllib.parse.urlsplit(ingress_url)
    except ValueError:
        raise LocalProtocolError("ingress URL does not parse") from None
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise LocalProtocolError("ingress URL must be a ws://, wss://, http:// or https:// URL with a host")
    path = parts.path
    if ingress_path:
        path = path.rstrip("/") + "/" + ingress_path.lstrip("/")
    query = urllib.parse.urlencode(
        [
            ("token", params.token),
            ("stereo", "true" if params.stereo else "false"),
            ("frame_duration_ms", str(params.frame_duration_ms)),
            ("track_name", params.track_name),
            ("track_source", params.track_source),
            ("metadata", params.metadata),
        ],
        quote_via=urllib.parse.quote,
        safe="",
    )
    if parts.query:
        query = f"{parts.query}&{query}"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, query, ""))


_MAX_QUERY_FIELDS = 64  # parameters in an ingress query; more is refused (bounded parsing)


def _bad_query(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, close_code=CloseCode.PROTOCOL_ERROR)


def parse_ingress_target(target: str) -> tuple[str, IngressParams]:
    """The path and parameters of an ingress request target (listen side).

    `target` is the HTTP request target of the WebSocket upgrade (``/path?query``) or a full
    URL. Defaults follow the spec's table: mono, 20 ms, empty track name, source and metadata.
    ``stereo`` takes true/false (also 1/0, any case); ``channels`` takes 1 or 2 as the
    alternative; both given and disagreeing is an error. ``frame_duration_ms`` must be 10, 20,
    40 or 60. Unknown parameters are ignored; a known one given twice is an error.

    Raises `RemoteProtocolError` with close code 1008 when the token is missing or empty (answer
    401 before the upgrade, or close with 1008 after it) and 1002 for a malformed or invalid
    value (answer 400, or close with 1002). Messages name the parameter, never a value.
    """
    try:
        parts = urllib.parse.urlsplit(target)
    except ValueError:
        raise _bad_query("ingress request target does not parse") from None
    try:
        pairs = urllib.parse.parse_qsl(
            parts.query, keep_blank_values=True, errors="strict", max_num_fields=_MAX_QUERY_FIELDS
        )
    except UnicodeDecodeError:
        raise _bad_query("ingress query is not valid percent-encoded UTF-8") from None
    except ValueError:
        raise _bad_query(f"ingress query has more than {_MAX_QUERY_FIELDS} parameters") from None
    known = ("token", "stereo", "channels", "frame_duration_ms", "track_name", "track_source", "metadata")
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in known:
            continue
        if key in values:
            raise _bad_query(f"ingress query parameter {key} given twice")
        values[key] = value
    token = values.get("token", "")
    if not token:
        raise RemoteProtocolError("ingress query has no token", close_code=CloseCode.POLICY_VIOLATION)
    stereo: bool | None = None
    if "stereo" in values:
        flag = values["stereo"].lower()
        if flag not in ("true", "false", "1", "0"):
            raise _bad_query("ingress query parameter stereo must be true or false")
        stereo = flag in ("true", "1")
    if "channels" in values:
        if values["channels"] not in ("1", "2"):
            raise _bad_query("ingress query parameter channels must be 1 or 2")
        from_channels = values["channels"] == "2"
        if stereo is not None and stereo != from_channels:
            raise _bad_query("ingress query parameters stereo and channels disagree")
        stereo = from_channels
    frame_duration_ms = 20
    if "frame_duration_ms" in values:
        raw = values["frame_duration_ms"]
        if raw not in {str(ms) for ms in FRAME_DURATIONS_MS}:
            raise _bad_query(f"ingress query parameter frame_duration_ms must be one of {FRAME_DURATIONS_MS}")
        frame_duration_ms = int(raw)
    params = IngressParams(
        token=token,
        stereo=bool(stereo),
        frame_duration_ms=frame_duration_ms,
        track_name=values.get("track_name", ""),
        track_source=values.get("track_source", ""),
        metadata=values.get("metadata", ""),
    )
    return parts.path, params


# --- stream JWT (LiveKit-style access token, HS256) ------------------------------------------

STREAM_TOKEN_TTL_S = 2 * 60 * 60  # seconds; spec: "Token TTL 2 hours"
_JWT_ALGORITHM = "HS256"  # spec: "Token Type LiveKit JWT (HS256)"


class TokenError(GatewayError):
    """A stream or room JWT was refused: expired, not yet valid, bad signature, malformed, or
    without the room grant. The message names the cause and never contains the token.

    `status` is the HTTP status a listen side answers before the upgrade, as Argon's ingress
    classifies the cause (argon-voice-ws.md "Authentication"): 401 for a missing or
    unparseable token, 403 for everything else. `verify_room_token` sets it per cause;
    `verify_stream_token` (the seed's rules, unchanged) leaves the default, 403.
    """

    def __init__(self, message: str, *, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class StreamGrant:
    """What a verified stream JWT allows."""

    room: str
    """LiveKit room name, ``{spaceId}/{channelId}``."""
    space_id: str
    """Argon space, the part of `room` before the first "/"."""
    channel_id: str
    """Argon voice channel, the part of `room` after the first "/"."""
    identity: str
    """Participant identity, the ``sub`` claim."""
    expires_at: float
    """``exp`` claim: seconds since the epoch after which the token is refused."""


def room_name(space_id: str, channel_id: str) -> str:
    """The LiveKit room of a voice channel: ``{spaceId}/{channelId}`` (spec: "Room Name Format")."""
    return f"{space_id}/{channel_id}"


def issue_stream_token(
    secret: str,
    *,
    space_id: str,
    channel_id: str,
    identity: str,
    now: float,
    ttl_s: int = STREAM_TOKEN_TTL_S,
    issuer: str = "gateway",
    name: str = "",
) -> str:
    """A stream JWT (HS256) for `identity` in room ``{space_id}/{channel_id}``, valid from
    `now` (seconds since the epoch, floored) for `ttl_s` seconds (default 2 h).

    Claims, as LiveKit access tokens carry them: ``iss`` (`issuer`; LiveKit puts its API key
    here), ``sub`` = identity, ``name`` (only when `name` is given; Argon puts the bot's user id
    there too), ``nbf``, ``exp`` and ``video`` = {room, roomJoin: true, canPublish,
    canSubscribe, canPublishData, canUpdateOwnMetadata: true} (spec: "Bot Permissions"); built
    by `issue_room_token`. Raises `LocalProtocolError` for an empty secret, identity or id, an
    id containing "/", or a non-positive ttl. Use a secret of at least 32 bytes (RFC 7518
    §3.2; PyJWT warns otherwise).
    """
    if not secret:
        raise LocalProtocolError("stream token secret is empty")
    if not identity:
        raise LocalProtocolError("stream token identity is empty")
    for field_name, value in (("space_id", space_id), ("channel_id", channel_id)):
        if not value or "/" in value:
            raise LocalProtocolError(f"{field_name} must be non-empty and contain no '/'")
    if ttl_s <= 0:
        raise LocalProtocolError(f"ttl_s must be positive, got {ttl_s}")
    return issue_room_token(
        secret,
        room=room_name(space_id, channel_id),
        identity=identity,
        name=name,
        now=now,
        ttl_s=ttl_s,
        issuer=issuer,
    )


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if value is None:
        raise TokenError(f"stream token malformed: no {name} claim")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise TokenError(f"stream token malformed: {name} claim is not a number")
    return float(value)


def _finite(value: int | float) -> bool:
    """True for a number a float holds. JSON integers have no bound (``1`` and 400 zeros is
    valid JSON), and `math.isfinite` / `float` raise OverflowError for one beyond ~1.8e308:
    found by tests/test_fuzz.py, an unauthenticated token with such an ``exp`` made the audio
    upgrade handler crash instead of answering 401."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def verify_stream_token(secret: str, token: str, *, now: float) -> StreamGrant:
    """Check a stream JWT at time `now` (seconds since the epoch) and return its grant.

    Requires: HS256 signature by `secret`; ``exp`` present and ``now < exp``; ``nbf``, if
    present, ``<= now``; ``sub`` a non-empty string; ``video.room`` of the form
    ``{spaceId}/{channelId}`` with ``roomJoin`` and ``canPublish`` true (the ingress publishes).
    PyJWT's own clock checks are turned off: `now` is the only time used.

    Raises `TokenError` naming the cause: "stream token expired", "stream token not yet
    valid", "stream token signature does not verify", "stream token malformed: …",
    "stream token algorithm not allowed (HS256 only)", "stream token has no room grant", …
    """
    if not isinstance(token, str) or not token:
        raise TokenError("stream token malformed: empty")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[_JWT_ALGORITHM],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("stream token signature does not verify") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("stream token algorithm not allowed (HS256 only)") from None
    except jwt.DecodeError:
        raise TokenError("stream token malformed: not a decodable JWT") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"stream token invalid ({type(exc).__name__})") from None
    expires_at = _number(claims, "exp")
    if now >= expires_at:
        raise TokenError("stream token expired")
    if "nbf" in claims and now < _number(claims, "nbf"):
        raise TokenError("stream token not yet valid")
    identity = claims.get("sub")
    if not isinstance(identity, str) or not identity:
        raise TokenError("stream token malformed: no sub (identity) claim")
    video: Any = claims.get("video")  # a JSON value: checked below
    room = video.get("room") if isinstance(video, dict) else None
    if not isinstance(room, str) or not room or video.get("roomJoin") is not True:
        raise TokenError("stream token has no room grant")
    space_id, slash, channel_id = room.partition("/")
    if not slash or not space_id or not channel_id:
        raise TokenError("stream token room grant is not {spaceId}/{channelId}")
    if video.get("canPublish") is not True:
        raise TokenError("stream token does not grant publish")
    return StreamGrant(
        room=room, space_id=space_id, channel_id=channel_id, identity=identity, expires_at=expires_at
    )


# --- StreamToken REST ----------------------------------------------------------------------

#: Path of the StreamToken call under the bot API base (``https://api.argon.gl/api/bot``).
STREAM_TOKEN_PATH = "/IVoice/v1/StreamToken"
STREAM_TOKEN_RATE_PER_MINUTE = 5  # requests per minute per bot (spec: "Rate limited to 5 ...")
#: Content type of `error_body` (RFC 9457 problem details).
ERROR_CONTENT_TYPE = "application/problem+json"

# status -> (cause, permanent); spec "Prerequisites & Validation", 401 from the bot API's auth.
_STATUS_CAUSES = {
    400: ("channel is not a voice channel", True),
    401: ("bot token rejected", True),
    403: ("bot is not a member of the space", True),
    404: ("no such channel", True),
    408: ("request timed out", False),
    429: ("rate limited", False),
}


class StreamTokenError(ServiceError):
    """The StreamToken call failed. `status` and `permanent` as in `ServiceError`;
    `retry_after` is the number of seconds the service asked us to wait (429), else None."""


@attrs.frozen
class StreamTokenGrant:
    """A successful StreamToken response."""

    token: str = attrs.field(repr=False)
    """The stream JWT, for the ingress ``token`` query parameter. Kept out of `repr`."""
    ingress_url: str
    """``ingressUrl``: the WebSocket ingress base URL, e.g. ``ws://ingress.argon.gl:12880``."""
    room_name: str
    """``roomName``: ``{spaceId}/{channelId}``."""


def stream_token_request(space_id: str, channel_id: str) -> dict[str, str]:
    """JSON body of ``POST {api}/IVoice/v1/StreamToken`` (send with ``Authorization: Bot …``)."""
    if not space_id or not channel_id:
        raise LocalProtocolError("space_id and channel_id must be non-empty")
    return {"spaceId": space_id, "channelId": channel_id}


def _body_retry_after(body: Any) -> float | None:
    return body_retry_after(body, ("retryAfter", "retry_after", "retry_after_s"))


def _url_scheme(url: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    return parts.scheme.lower() if parts.netloc else None


def parse_stream_token_response(
    status: int,
    body: bytes,
    *,
    space_id: str | None = None,
    channel_id: str | None = None,
    retry_after_s: float | None = None,
) -> StreamTokenGrant:
    """The grant from a StreamToken response, or `StreamTokenError` (a `ServiceError`).

    2xx with ``{"token", "ingressUrl"[, "roomName"]}`` → the grant (``roomName`` defaults to
    ``{space_id}/{channel_id}``). Errors, by status: 400 "channel is not a voice channel",
    401 "bot token rejected", 403 "bot is not a member of the space", 404 "no such channel"
    (all permanent); 429 "rate limited" (not permanent; `retry_after` from `retry_after_s`,
    e.g. `parse_retry_after(headers["Retry-After"])`, else from a ``retryAfter`` /
    ``retry_after`` number in the JSON body); 408 and 5xx not permanent; other 4xx permanent;
    2xx whose body is not a JSON object, lacks ``token`` / ``ingressUrl`` (naming the missing
    field) or whose ``ingressUrl`` is not a ws(s):// or http(s):// URL → not permanent.
    Messages name the space and channel ids when given, never the token or the response body.
    """
    where = "Argon StreamToken"
    if space_id is not None or channel_id is not None:
        where += f" (space {space_id}, channel {channel_id})"
    try:
        parsed: Any = json.loads(body) if body else None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        parsed = None
    if 200 <= status < 300:
        if not isinstance(parsed, dict):
            raise StreamTokenError(f"{where}: response is not a JSON object", status=status, permanent=False)
        fields = {}
        for key in ("token", "ingressUrl"):
            value = parsed.get(key)
            if not isinstance(value, str) or not value:
                raise StreamTokenError(
                    f"{where}: response has no {key} field", status=status, permanent=False
                )
            fields[key] = value
        if _url_scheme(fields["ingressUrl"]) not in _WS_SCHEMES:
            raise StreamTokenError(
                f"{where}: response ingressUrl is not a ws:// or wss:// URL", status=status, permanent=False
            )
        room = parsed.get("roomName")
        if not isinstance(room, str) or not room:
            room = room_name(space_id or "", channel_id or "")
        return StreamTokenGrant(token=fields["token"], ingress_url=fields["ingressUrl"], room_name=room)
    cause, permanent = status_cause(status, _STATUS_CAUSES)
    retry_after = None
    if status == 429:
        retry_after = retry_after_s if retry_after_s is not None else _body_retry_after(parsed)
    suffix = f", retry after {_ms(retry_after)} s" if retry_after is not None else ""
    raise StreamTokenError(
        f"{where}: {cause} (HTTP {status}{suffix})",
        status=status,
        permanent=permanent,
        retry_after=retry_after,
    )


def stream_token_response(token: str, ingress_url: str, room_name: str) -> bytes:
    """JSON body of a successful StreamToken response (listen side), as the spec shows it:
    ``{"token": …, "ingressUrl": …, "roomName": …}``."""
    return json.dumps(
        {"token": token, "ingressUrl": ingress_url, "roomName": room_name}, separators=(",", ":")
    ).encode()


def error_body(status: int, message: str, *, retry_after_s: float | None = None) -> bytes:
    """JSON error body (listen side): RFC 9457 problem details, served as `ERROR_CONTENT_TYPE`.

    ``{"type": "about:blank", "title": <HTTP reason phrase>, "status": status, "detail":
    message}`` plus ``"retryAfter": seconds`` when given (also send the ``Retry-After``
    header). `parse_stream_token_response` reads ``retryAfter`` back. Never put a token in
    `message`.
    """
    try:
        title = http.HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    problem: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": message}
    if retry_after_s is not None:
        problem["retryAfter"] = retry_after_s
    return json.dumps(problem, separators=(",", ":")).encode()


# =============================================================================================
# Argon's voice paths as its own server serves them (argon-voice-ws.md)
# =============================================================================================
#
# Everything below follows /work/shared/protocols/argon-voice-ws.md, which restates what
# Argon's ingress server (argon-chat/lk-ingress, pkg/audiows/), its reference bot
# (argon-chat/echo-bot) and its bot API docs do. Where the seeds above and the server
# disagree, the dial side follows the server and the listen side accepts both (the bare "/"
# of the seeds is read as /audio/connect).

# --- audio paths and the upgrade request (argon-voice-ws.md "The three paths") -------------

AUDIO_PORT = 12880  # the ingress's port in production ("plain WebSocket, port 12880")
ROOM_TOKEN_LEEWAY_S = 60.0  # seconds of clock skew the server allows on exp / nbf ("about 1 min")
CALL_TOKEN_TTL_S = 60 * 60  # seconds; call tokens from Calls Accept live 1 h ("call tokens: 1 h")
#: Largest client message the server reads, bytes (argon-voice-ws.md "Keepalive and close").
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024  # 64 KiB on connect and duplex; larger → close 1009
MAX_SUBSCRIBE_CLIENT_MESSAGE_BYTES = 1024  # 1 KiB on subscribe; larger → close 1009
#: Opus packet sizes the publish paths accept, bytes ("Publishing": 2 to 3,825 bytes).
MIN_PUBLISH_PACKET_BYTES = 2
MAX_PUBLISH_PACKET_BYTES = 3 * 1275  # 3,825: three maximal frames (RFC 6716 §3.2.1)
#: Opus silence packet the reference bot sends in place of an invalid one (20 ms CELT FB, DTX).
OPUS_SILENCE_PACKET = b"\xf8\xff\xfe"

TRACK_SOURCE_MICROPHONE = "microphone"
TRACK_SOURCE_SCREEN_SHARE_AUDIO = "screen_share_audio"
_TRACK_SOURCES = (TRACK_SOURCE_MICROPHONE, TRACK_SOURCE_SCREEN_SHARE_AUDIO)


class AudioPath(enum.Enum):
    """The ingress's WebSocket paths (argon-voice-ws.md "The three paths")."""

    CONNECT = "/audio/connect"  #: publish one Opus track (what the seeds describe)
    SUBSCRIBE = "/audio/subscribe"  #: hear one participant of the room, publish nothing
    DUPLEX = "/audio/duplex"  #: publish and hear one participant on the same socket

    @property
    def publishes(self) -> bool:
        """True when the client sends Opus packets on this path (connect, duplex)."""
        return self is not AudioPath.SUBSCRIBE

    @property
    def hears(self) -> bool:
        """True when the server sends the target's Opus packets on this path (subscribe,
        duplex); such a path needs ``target_identity``."""
        return self is not AudioPath.CONNECT


class AudioRefusal(GatewayError):
    """The listen side refuses an audio upgrade request before the upgrade.

    `status` is the HTTP status to answer (400, 401, 404; the server's other refusals, 403
    and 503, come from `verify_room_token` and admission); the answer is a plain-text body,
    `str(err)` (= `reason`), never a WebSocket close code (argon-voice-ws.md "Every refusal is
    a plain-text HTTP error before the upgrade"). The message never contains the token.

    `token` is the request's token (unverified) when it was read before the refusal (a 400 for
    a missing ``target_identity``), else None: the server verifies the token first, so a
    listen side checks it before answering 400. It is not part of the message or `repr`.
    """

    def __init__(self, message: str, *, status: int, token: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = message
        self.token = token


@attrs.frozen(kw_only=True)
class AudioRequest:
    """An audio upgrade request as the listen side reads it (`parse_audio_request`).

    Parameters a path does not read keep their defaults (connect reads no target; subscribe
    reads no publish parameters), exactly as the server ignores them.
    """

    path: AudioPath
    """Which of the three paths was asked for."""
    legacy: bool = False
    """True when the request used the seed documents' bare path "/" (read as CONNECT); Argon's
    own server answers 404 there, the gateway's listen role accepts it."""
    token: str = attrs.field(repr=False)
    """The room JWT (unverified: check it with `verify_room_token`). Kept out of `repr`."""
    token_from_header: bool = False
    """True when the token came from ``Authorization: Bearer …``, False for ``?token=``."""
    stereo: bool = False
    """Publish paths: 2 channels (``stereo=true`` exactly, or ``channels=2``), else mono."""
    frame_duration_ms: int = 20
    """Publish paths: ms of audio stamped on each packet; positive, no range check (the server
    never compares it with the TOC). Missing, unparseable or ≤ 0 means 20."""
    track_name: str = "audio"
    """Publish paths: the published track's name; empty or missing means "audio"."""
    track_source: str = TRACK_SOURCE_MICROPHONE
    """Publish paths: "screen_share_audio" when exactly that was asked, else "microphone"."""
    metadata: str = ""
    """Publish paths: arbitrary participant metadata, as sent."""
    target_identity: str | None = None
    """Hear paths: identity (Argon user GUID) of the participant to hear; None on connect."""
    target_track_source: str | None = None
    """Hear paths: "microphone" or "screen_share_audio"; None means every audio track of the
    target (the server's reading of an empty or any other value)."""

    @property
    def channels(self) -> int:
        """2 when `stereo`, else 1."""
        return 2 if self.stereo else 1


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ATOI = re.compile(r"[+-]?[0-9]{1,18}")  # Go strconv.Atoi's syntax, within int64 range
_NOT_FOUND_TEXT = "404 page not found"  # Go's http.NotFound body, what the server answers


def _refuse(status: int, message: str) -> AudioRefusal:
    return AudioRefusal(message, status=status)


def _bearer_token(authorization: str | None) -> str | None:
    """The credentials of ``Authorization: Bearer <jwt>`` (scheme in any case), or None when
    the header is absent, has another scheme (``Bot …`` is not read) or no credentials. As the
    server reads it: the header value trimmed (Go's net/http), split at the first space
    (``strings.SplitN(h, " ", 2)``), the scheme compared with ``EqualFold``; the credentials
    are trimmed too (the server would refuse " <jwt>" as unparseable)."""
    if authorization is None:
        return None
    scheme, space, credentials = authorization.strip().partition(" ")
    if not space or scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def _split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target: origin-form ``/path?query`` (RFC 9112 §3.2.1; a
    path starting "//" is a path, not an authority) or an absolute URL."""
    if target.startswith("/"):
        path, _, query = target.partition("#")[0].partition("?")
        return path, query
    try:
        parts = urllib.parse.urlsplit(target)
    except ValueError:
        raise _refuse(400, "request target does not parse") from None
    if not parts.scheme or not parts.netloc:
        raise _refuse(400, "request target is neither /path?query nor an absolute URL")
    return parts.path, parts.query


def parse_audio_request(target: str, authorization: str | None) -> AudioRequest:
    """The listen side's reading of an audio upgrade request, as Argon's server reads it.

    `target` is the HTTP request target (``/audio/duplex?token=…``) or a full URL;
    `authorization` is the ``Authorization`` header or None. argon-voice-ws.md "The three
    paths", "Authentication", "Query parameters":

    - Path: /audio/connect, /audio/subscribe, /audio/duplex exactly; the bare "/" (or an empty
      path) is the seeds' legacy publish path, read as CONNECT with `legacy` True; anything
      else → `AudioRefusal` 404 "404 page not found".
    - Query: at most 64 fields (→ 400), ``+`` is a space, a malformed percent escape or
      escaped bytes that are not UTF-8 → 400. A parameter given twice: the first wins (Go's
      ``Query().Get``). Unknown parameters are ignored.
    - Token: ``Authorization: Bearer <jwt>`` (scheme case-insensitive), else ``?token=``;
      none → 401 "missing authorization token". The token is not verified here (see
      `verify_room_token`, which gives the 401/403 statuses of a bad token).
    - Publish paths: ``stereo`` only for exactly ``true``, or ``channels=2``;
      ``frame_duration_ms`` an integer (Go ``strconv.Atoi`` syntax: optional sign, digits),
      missing, unparseable or ≤ 0 → 20, no range check; ``track_name`` empty → "audio";
      ``track_source`` "screen_share_audio" exactly, else "microphone"; ``metadata`` as sent.
    - Hear paths: ``target_identity`` required → 400 "missing target_identity parameter";
      ``target_track_source`` "microphone" / "screen_share_audio", anything else → None.

    The server checks the token before `target_identity`; a listen side that wants the
    same order for a request with both wrong verifies the token of a 400 first (the
    refusal's `AudioRefusal.token`). Messages never contain the token.
    """
    raw_path, query = _split_target(target)
    legacy = raw_path in ("", "/")
    if legacy:
        path = AudioPath.CONNECT
    else:
        try:
            path = AudioPath(urllib.parse.unquote(raw_path))
        except ValueError:
            raise _refuse(404, _NOT_FOUND_TEXT) from None
    if _BAD_PERCENT.search(query):
        raise _refuse(400, "query has a malformed percent escape")
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, errors="strict", max_num_fields=_MAX_QUERY_FIELDS
        )
    except UnicodeDecodeError:
        raise _refuse(400, "query is not valid percent-encoded UTF-8") from None
    except ValueError:
        raise _refuse(400, f"query has more than {_MAX_QUERY_FIELDS} parameters") from None
    values: dict[str, str] = {}
    for key, value in pairs:
        values.setdefault(key, value)  # the first value wins, as Go's url.Values.Get
    header_token = _bearer_token(authorization)
    token = header_token if header_token is not None else values.get("token", "")
    if not token:
        raise _refuse(401, "missing authorization token")
    fields: dict[str, Any] = {}
    if path.publishes:
        raw_ms = values.get("frame_duration_ms", "")
        frame_ms = int(raw_ms) if _ATOI.fullmatch(raw_ms) else 0
        source = values.get("track_source", "")
        fields.update(
            stereo=values.get("stereo") == "true" or values.get("channels") == "2",
            frame_duration_ms=frame_ms if frame_ms > 0 else 20,
            track_name=values.get("track_name", "") or "audio",
            track_source=source if source == TRACK_SOURCE_SCREEN_SHARE_AUDIO else TRACK_SOURCE_MICROPHONE,
            metadata=values.get("metadata", ""),
        )
    if path.hears:
        target_identity = values.get("target_identity", "")
        if not target_identity:
            raise AudioRefusal("missing target_identity parameter", status=400, token=token)
        target_source = values.get("target_track_source", "")
        fields.update(
            target_identity=target_identity,
            target_track_source=target_source if target_source in _TRACK_SOURCES else None,
        )
    return AudioRequest(
        path=path, legacy=legacy, token=token, token_from_header=header_token is not None, **fields
    )


def build_audio_url(
    base_url: str,
    path: AudioPath,
    *,
    token: str,
    stereo: bool = False,
    frame_duration_ms: int = 20,
    track_name: str = "",
    track_source: str = "",
    metadata: str = "",
    target_identity: str | None = None,
    target_track_source: str | None = None,
) -> str:
    """The WebSocket URL the dial side opens: ``{base_url}{path}?token=…&…``.

    `base_url` is StreamToken's ``ingressUrl`` or Calls Accept's ``audioBaseUrl``: a bare
    base (``ws://host:12880``); http(s) becomes ws(s), a path of its own is kept with exactly
    one slash before the audio path, a query of its own is kept in front. Query, percent-encoded
    (RFC 3986, spaces as %20): ``token``; on publish paths ``stereo=true|false`` and
    ``frame_duration_ms``, then ``track_name``, ``track_source``, ``metadata`` when non-empty
    (the server reads empty and missing alike); on hear paths ``target_identity`` and
    ``target_track_source`` when given. Parameters the path does not read are left out (one
    set of settings serves every path). (argon-voice-ws.md "Query parameters"; the reference
    bot's duplex URL is ``…/audio/duplex?token=…&target_identity=<callerId>&
    target_track_source=microphone&stereo=false&frame_duration_ms=20``).

    Raises `LocalProtocolError` for a base URL that is not ws/wss/http/https with a host, an
    empty token, a `frame_duration_ms` that is not a positive integer or a hear path without
    `target_identity`. Messages never contain the token or the base URL.
    """
    if not isinstance(path, AudioPath):
        raise LocalProtocolError(f"path must be an AudioPath, got {type(path).__name__}")
    if not token:
        raise LocalProtocolError("audio URL token is empty")
    try:
        parts = urllib.parse.urlsplit(base_url)
    except ValueError:
        raise LocalProtocolError("audio base URL does not parse") from None
    scheme = _WS_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise LocalProtocolError("audio base URL must be a ws://, wss://, http:// or https:// URL with a host")
    if isinstance(frame_duration_ms, bool) or not isinstance(frame_duration_ms, int) or frame_duration_ms <= 0:
        raise LocalProtocolError(f"frame_duration_ms must be a positive integer, got {frame_duration_ms!r}")
    query: list[tuple[str, str]] = [("token", token)]
    if path.publishes:
        query += [("stereo", "true" if stereo else "false"), ("frame_duration_ms", str(frame_duration_ms))]
        optional = (("track_name", track_name), ("track_source", track_source), ("metadata", metadata))
        query += [(key, value) for key, value in optional if value]
    if path.hears:
        if not target_identity:
            raise LocalProtocolError(f"{path.value} needs a target_identity")
        query.append(("target_identity", target_identity))
        if target_track_source:
            query.append(("target_track_source", target_track_source))
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="")
    if parts.query:
        encoded = f"{parts.query}&{encoded}"
    full_path = parts.path.rstrip("/") + path.value
    return urllib.parse.urlunsplit((scheme, parts.netloc, full_path, encoded, ""))


# --- room tokens (LiveKit access tokens, argon-voice-ws.md "Authentication") ----------------


@attrs.frozen
class RoomGrant:
    """What a verified room JWT allows (`verify_room_token`)."""

    room: str
    """LiveKit room name (``video.room``): ``{spaceId}/{channelId}`` for a voice channel, or
    the call's room name for a call token."""
    identity: str
    """Participant identity, the ``sub`` claim (the bot's user GUID on Argon)."""
    name: str
    """Participant name, the ``name`` claim ("" when absent)."""
    expires_at: float
    """``exp`` claim: seconds since the epoch (the server allows `ROOM_TOKEN_LEEWAY_S` past it)."""
    can_publish: bool
    """``video.canPublish``; absent means True (LiveKit's default)."""
    can_subscribe: bool
    """``video.canSubscribe``; absent means True (LiveKit's default)."""

    @property
    def space_id(self) -> str | None:
        """The space of a ``{spaceId}/{channelId}`` room, else None."""
        ids = self._ids()
        return ids[0] if ids else None

    @property
    def channel_id(self) -> str | None:
        """The voice channel of a ``{spaceId}/{channelId}`` room, else None."""
        ids = self._ids()
        return ids[1] if ids else None

    def _ids(self) -> tuple[str, str] | None:
        space, slash, channel = self.room.partition("/")
        if not slash or not space or not channel or "/" in channel:
            return None
        return space, channel


def issue_room_token(
    secret: str,
    *,
    room: str,
    identity: str,
    name: str = "",
    now: float,
    ttl_s: int,
    issuer: str = "gateway",
    can_publish: bool = True,
    can_subscribe: bool = True,
) -> str:
    """A LiveKit access token (HS256) for `identity` in `room`, valid from `now` (seconds since
    the epoch, floored) for `ttl_s` seconds (`STREAM_TOKEN_TTL_S` for a voice channel,
    `CALL_TOKEN_TTL_S` for a call).

    Claims, in this order: ``iss`` (`issuer`; LiveKit's API key), ``sub`` (identity), ``name``
    (only when non-empty), ``nbf``, ``exp``, ``video`` = {room, roomJoin: true, canPublish,
    canSubscribe, canPublishData: true, canUpdateOwnMetadata: true}. Raises
    `LocalProtocolError` for an empty secret, room or identity, or a non-positive ttl.
    """
    if not secret:
        raise LocalProtocolError("room token secret is empty")
    if not room:
        raise LocalProtocolError("room token room is empty")
    if not identity:
        raise LocalProtocolError("room token identity is empty")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s <= 0:
        raise LocalProtocolError(f"ttl_s must be positive, got {ttl_s!r}")
    issued = int(now)
    claims: dict[str, Any] = {"iss": issuer, "sub": identity}
    if name:
        claims["name"] = name
    claims["nbf"] = issued
    claims["exp"] = issued + int(ttl_s)
    claims["video"] = {
        "room": room,
        "roomJoin": True,
        "canPublish": bool(can_publish),
        "canSubscribe": bool(can_subscribe),
        "canPublishData": True,
        "canUpdateOwnMetadata": True,
    }
    return jwt.encode(claims, secret, algorithm=_JWT_ALGORITHM)


def _claim_number(claims: dict[str, Any], name: str) -> float | None:
    """A registered NumericDate claim (RFC 7519 §2), None when absent; 401 when ill-typed (the
    server cannot parse such a token's claims)."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise TokenError(f"room token malformed: {name} claim is not a number", status=401)
    return float(value)


def verify_room_token(
    secret: str, token: str, *, now: float, issuer: str | None = None, leeway_s: float = ROOM_TOKEN_LEEWAY_S
) -> RoomGrant:
    """Check a room JWT at `now` (seconds since the epoch) as Argon's ingress does and return
    its grant; raise `TokenError` with the server's status otherwise.

    Order and statuses (argon-voice-ws.md "Authentication"; the server parses the token, then
    compares the issuer with its API key, then verifies it, then reads the grants):

    - 401: empty token; not a JWT (segments, base64url, JSON object header and payload);
      a registered claim of the wrong type (``iss``/``sub`` not strings, ``exp``/``nbf``/
      ``iat`` not numbers).
    - 403: ``iss`` not `issuer` (only when `issuer` is given); algorithm other than HS256;
      signature does not verify with `secret`; no ``exp`` claim (stricter than LiveKit, which
      accepts a token without one; every token Argon and the gateway issue has it); expired,
      ``now > exp + leeway_s``; not yet valid, ``now + leeway_s < nbf``; issued in the future,
      ``now + leeway_s < iat``; no room grant (``video.room`` missing or empty, or ``roomJoin``
      not true); ``canPublish``/``canSubscribe``/``name`` of the wrong type; no identity
      (``sub`` missing or empty).

    PyJWT's own clock checks are off: `now` is the only time used. The message names the cause
    and never contains the token, the secret or a claim value. Raises `LocalProtocolError` for
    an empty secret or a negative leeway.
    """
    if not secret:
        raise LocalProtocolError("room token secret is empty")
    if leeway_s < 0:
        raise LocalProtocolError(f"leeway_s must be >= 0, got {leeway_s!r}")
    if not isinstance(token, str) or not token:
        raise TokenError("room token is empty", status=401)
    try:
        unverified = jwt.decode_complete(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError("room token malformed: not a JWT", status=401) from None
    header, claims = unverified["header"], unverified["payload"]
    for name in ("iss", "sub"):
        if name in claims and not isinstance(claims[name], str):
            raise TokenError(f"room token malformed: {name} claim is not a string", status=401)
    expires_at = _claim_number(claims, "exp")
    not_before = _claim_number(claims, "nbf")
    issued_at = _claim_number(claims, "iat")
    if issuer is not None and claims.get("iss") != issuer:
        raise TokenError("room token issuer is not accepted", status=403)
    if header.get("alg") != _JWT_ALGORITHM:
        raise TokenError("room token algorithm not allowed (HS256 only)", status=403)
    try:
        jwt.decode(
            token,
            secret,
            algorithms=[_JWT_ALGORITHM],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("room token signature does not verify", status=403) from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"room token invalid ({type(exc).__name__})", status=403) from None
    if expires_at is None:
        raise TokenError("room token has no exp claim", status=403)
    if now > expires_at + leeway_s:
        raise TokenError("room token expired", status=403)
    if not_before is not None and now + leeway_s < not_before:
        raise TokenError("room token not yet valid", status=403)
    if issued_at is not None and now + leeway_s < issued_at:
        raise TokenError("room token issued in the future", status=403)
    video = claims.get("video")
    room = video.get("room") if isinstance(video, dict) else None
    if not isinstance(room, str) or not room or video.get("roomJoin") is not True:
        raise TokenError("room token has no room grant", status=403)
    grants = {}
    for key in ("canPublish", "canSubscribe"):
        value = video.get(key, True)
        if value is None:
            value = True
        if not isinstance(value, bool):
            raise TokenError(f"room token grant {key} is not a boolean", status=403)
        grants[key] = value
    name = claims.get("name", "")
    if name is None:
        name = ""
    if not isinstance(name, str):
        raise TokenError("room token name claim is not a string", status=403)
    identity = claims.get("sub")
    if not identity:
        raise TokenError("room token has no identity (sub claim)", status=403)
    return RoomGrant(
        room=room,
        identity=identity,
        name=name,
        expires_at=expires_at,
        can_publish=grants["canPublish"],
        can_subscribe=grants["canSubscribe"],
    )


# --- status messages (argon-voice-ws.md "Text messages from the server") -------------------

STATUS_READY = "ready"  # connect, duplex: once, after the room is joined and the track published
STATUS_WAITING = "waiting"  # subscribe: the target is absent or has no matching track
STATUS_SUBSCRIBED = "subscribed"  # subscribe, duplex: a matching track of the target started
STATUS_TARGET_LEFT = "target_left"  # subscribe, duplex: the target left the room
STATUS_ERROR = "error"  # all: creating the session failed; the socket then closes

_STATUS_FIELDS = ("session_id", "participant_identity", "track_sid", "message")


@attrs.frozen
class StatusMessage:
    """One JSON text message from the ingress (argon-voice-ws.md "Text messages from the
    server"). Unknown keys are ignored; absent or null fields are None."""

    status: str
    """"ready", "waiting", "subscribed", "target_left", "error" (the ``STATUS_*`` constants),
    or any other non-empty string, as sent (key ``status``; ``type`` before mid-2026)."""
    session_id: str | None = None
    """The server's session id, ``AWS_…``."""
    participant_identity: str | None = None
    """waiting, subscribed, target_left: the target's identity."""
    track_sid: str | None = None
    """subscribed: the LiveKit track id of the track that started."""
    message: str | None = None
    """error: why creating the session failed ("failed to create …")."""


def _bad_text(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, close_code=CloseCode.INVALID_PAYLOAD)


def parse_status_message(text: str | bytes) -> StatusMessage:
    """Read one text message of the ingress.

    A JSON object (RFC 8259, no NaN/Infinity) with a non-empty string under ``status``, or
    under the older key ``type`` (servers before mid-2026; ``status`` wins when both are
    present); ``session_id``, ``participant_identity``, ``track_sid``, ``message`` strings or
    null. Raises `RemoteProtocolError(close_code=1007)` naming the cause: "status message is
    not JSON", "… is an array, not an object", "status message has no status (or type)",
    "status message session_id is a number, not a string", ….
    """
    try:
        parsed = loads_strict(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _bad_text("status message is not JSON") from None
    if not isinstance(parsed, dict):
        raise _bad_text(f"status message is {json_type(parsed)}, not an object")
    key = "status" if "status" in parsed else "type"
    status = parsed.get(key)
    if status is None:
        raise _bad_text("status message has no status (or type)")
    if not isinstance(status, str):
        raise _bad_text(f"status message {key} is {json_type(status)}, not a string")
    if not status:
        raise _bad_text(f"status message {key} is empty")
    fields: dict[str, str | None] = {}
    for name in _STATUS_FIELDS:
        value = parsed.get(name)
        if value is not None and not isinstance(value, str):
            raise _bad_text(f"status message {name} is {json_type(value)}, not a string")
        fields[name] = value
    return StatusMessage(status=status, **fields)


def status_message(status: str, **fields: str | None) -> str:
    """Compact JSON text of one status message (listen side): ``{"status": …}`` first, then
    the given fields in the order given, None fields omitted, e.g.
    ``status_message("ready", session_id="AWS_x")`` → ``{"status":"ready","session_id":"AWS_x"}``.
    Raises `LocalProtocolError` for an empty status or a value that is not a string."""
    if not isinstance(status, str) or not status:
        raise LocalProtocolError("status must be a non-empty string")
    body: dict[str, str] = {"status": status}
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise LocalProtocolError(f"status message field {name} must be a string, got {type(value).__name__}")
        body[name] = value
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


# --- bot REST: calls, self, events (argon-voice-ws.md "Calls and events") ------------------

#: Paths under the bot API base (``https://gateway.argon.zone``; older docs ``…/api/bot``).
EVENTS_PATH = "/IEvents/v1/Stream"  # GET ?intents=<bitmask>: server-sent events (see sse.py)
CALLS_ACCEPT_PATH = "/ICalls/v20260401/Accept"  # POST {callId} → {token, roomName, callerId, audioBaseUrl}
CALLS_REJECT_PATH = "/ICalls/v20260401/Reject"  # POST {callId, reason?}
GET_ME_PATH = "/IBotSelf/v1/GetMe"  # GET → {botId, userId, username, displayName}
INTENT_VOICE = 1 << 11  # 2048: voiceJoin / voiceLeave
INTENT_CALLS = 1 << 12  # 4096 (verified bots): callIncoming / callEnded
#: StreamToken calls a minute per bot the server allows today (the seed's figure is
#: `STREAM_TOKEN_RATE_PER_MINUTE`, 5).
STREAM_TOKEN_RATE_PER_MINUTE_SERVER = 20
CALLS_RATE_PER_MINUTE = 20  # Accept / Reject calls a minute per bot
EVENTS_CONNECTS_PER_MINUTE = 5  # events stream connects a minute per bot
EVENTS_RESUME_WINDOW_S = 10 * 60  # seconds a stream position is kept for Last-Event-ID
EVENTS_HEARTBEAT_S = 30  # seconds of idle after which the server sends a heartbeat event
#: Content type of `api_error_body`.
API_ERROR_CONTENT_TYPE = "application/json"

# status -> (cause, permanent) of Calls Accept / Reject (the bot API manifest's error table:
# 400 accept_failed / not_ringing, 403 not_callee / not_verified; 401 from the bot auth).
_CALLS_STATUS_CAUSES = {
    400: ("bad request", True),
    401: ("bot token rejected", True),
    403: ("not allowed (bot not verified, or not the callee)", True),
    404: ("no such call (it ended or was taken)", True),
    408: ("request timed out", False),
    409: ("call already answered", True),
    429: ("rate limited", False),
}
_GET_ME_STATUS_CAUSES = {
    401: ("bot token rejected", True),
    408: ("request timed out", False),
    429: ("rate limited", False),
}

_MAX_CAUSE_CHARS = 160  # of a server's own error text quoted in a message
#: Runs that may be a secret (bot token, JWT, API key): 20+ characters of token alphabets.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9_~+/=.-]{20,}")
_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
#: "Bot <token>", "Bearer <token>", "token=<token>", "token: <token>": the value is a secret.
_AUTH_SCHEME_VALUE = re.compile(r"(?i)\b(bot\s+|bearer\s+|token\s*[:=]\s*)[A-Za-z0-9_~+/=.-]{6,}")
#: Argon's error codes ("call_already_answered", "not_voice_channel"): quoted as they are, though
#: some are as long as a token-like run (lowercase words joined by underscores: no token looks so).
_ERROR_CODE = re.compile(r"[a-z]{1,32}(?:_[a-z]{1,32}){0,7}")


def _scrub(text: str) -> str:
    """A server's error text fit to quote: control characters dropped, the value after an
    auth word ("Bot …", "Bearer …", "token=…") and every run that looks like a token (20+
    characters of base64/JWT alphabets, GUIDs excepted) replaced by "…", at most
    `_MAX_CAUSE_CHARS` characters. A secret shorter than that and not after such a word could
    pass; Argon's bot tokens and JWTs are far longer."""
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    text = _AUTH_SCHEME_VALUE.sub(lambda m: f"{m.group(1)}…", text)
    text = _SECRET_LIKE.sub(lambda m: m.group(0) if _GUID.fullmatch(m.group(0)) else "…", text)
    if len(text) > _MAX_CAUSE_CHARS:
        text = text[: _MAX_CAUSE_CHARS - 1] + "…"
    return text


def _server_cause(parsed: Any) -> str | None:
    """The cause a refused call's body gives: Argon's ``{"error": code, "message": …}`` or RFC
    9457 problem details (``detail``, else ``title``), scrubbed of anything token-like."""
    if not isinstance(parsed, dict):
        return None
    if isinstance(parsed.get("error"), str):  # Argon: {"error": code, "message": text}
        keys: tuple[str, ...] = ("error", "message")
    elif isinstance(parsed.get("detail"), str):  # RFC 9457 §3.1.4
        keys = ("detail",)
    else:  # RFC 9457 §3.1.3
        keys = ("title",)
    pieces = [value if key == "error" and _ERROR_CODE.fullmatch(value) else _scrub(value)
              for key in keys if isinstance(value := parsed.get(key), str)]
    text = ": ".join(piece for piece in pieces if piece)
    return text or None


def _parse_body(body: bytes) -> Any:
    try:
        return loads_strict(body) if body else None
    except (ValueError, RecursionError):
        return None


def api_error_cause(body: bytes) -> str | None:
    """The cause a refused bot API request's body gives, fit to quote in an error: Argon's
    ``{"error", "message"}`` (or RFC 9457 ``detail`` / ``title``), else the start of a body that
    is not JSON (a proxy's text), scrubbed of anything token-like; None when it says nothing.
    For refusals outside the parse functions above (the events stream's)."""
    parsed = _parse_body(body)
    if parsed is not None:
        return _server_cause(parsed)
    return _scrub(body[: 2 * _MAX_CAUSE_CHARS].decode("utf-8", "replace")) or None


def _refused(
    error: type[ServiceError],
    where: str,
    status: int,
    parsed: Any,
    causes: dict[int, tuple[str, bool]],
    retry_after_s: float | None,
) -> ServiceError:
    cause, permanent = status_cause(status, causes)
    retry_after = None
    if status == 429:
        retry_after = retry_after_s if retry_after_s is not None else _body_retry_after(parsed)
    suffix = f", retry after {_ms(retry_after)} s" if retry_after is not None else ""
    server = _server_cause(parsed)
    told = f": {server}" if server else ""
    return error(
        f"{where}: {cause} (HTTP {status}{suffix}){told}",
        status=status,
        permanent=permanent,
        retry_after=retry_after,
    )


class CallsError(ServiceError):
    """A Calls Accept or Reject call failed. `status`, `permanent` and `retry_after` as in
    `ServiceError`; the message names the call id and the cause, never a token."""


class BotSelfError(ServiceError):
    """The GetMe call failed (`ServiceError`; 401 is permanent: the bot token is wrong)."""


@attrs.frozen
class CallGrant:
    """A successful Calls Accept response."""

    token: str = attrs.field(repr=False)
    """Room JWT of the call (1 h TTL), for the audio URL's ``token``. Kept out of `repr`."""
    room_name: str
    """``roomName``: the call's LiveKit room."""
    caller_id: str
    """``callerId``: the caller's user GUID, the ``target_identity`` to hear."""
    audio_base_url: str
    """``audioBaseUrl``: bare base of the audio paths (`build_audio_url` with DUPLEX)."""


def accept_request(call_id: str) -> dict[str, str]:
    """JSON body of ``POST {api}/ICalls/v20260401/Accept`` (``Authorization: Bot …``)."""
    if not call_id:
        raise LocalProtocolError("call_id must be non-empty")
    return {"callId": call_id}


def _required_strings(
    error: type[ServiceError], where: str, status: int, parsed: Any, keys: tuple[str, ...]
) -> dict[str, str]:
    if not isinstance(parsed, dict):
        raise error(f"{where}: response is not a JSON object", status=status, permanent=False)
    fields = {}
    for key in keys:
        value = parsed.get(key)
        if not isinstance(value, str) or not value:
            raise error(f"{where}: response has no {key} field", status=status, permanent=False)
        fields[key] = value
    return fields


def parse_accept_response(
    status: int, body: bytes, *, call_id: str, retry_after_s: float | None = None
) -> CallGrant:
    """The grant from a Calls Accept response, or `CallsError` (a `ServiceError`).

    2xx with ``{"token", "roomName", "callerId", "audioBaseUrl"}`` (non-empty strings;
    ``audioBaseUrl`` a ws/wss/http/https URL with a host) → the grant. Errors, by status:
    400 "bad request" (accept_failed, not_ringing), 401 "bot token rejected", 403 "not allowed
    (bot not verified, or not the callee)", 404 "no such call (it ended or was taken)", 409
    "call already answered" (all permanent); 429 "rate limited" (not permanent; `retry_after`
    from `retry_after_s`, e.g. `parse_retry_after(headers["Retry-After"])`, else a
    ``retryAfter`` number in the body); 408 and 5xx not permanent; other 4xx permanent; a 2xx
    that is not a JSON object or lacks a field (named) → not permanent. The message names the
    call id and quotes the server's own cause (Argon's ``error``/``message``, or RFC 9457
    ``detail``/``title``) scrubbed of token-like text; never the token.
    """
    where = f"Argon Calls Accept (call {call_id})"
    parsed = _parse_body(body)
    if 200 <= status < 300:
        fields = _required_strings(CallsError, where, status, parsed, ("token", "roomName", "callerId", "audioBaseUrl"))
        if _url_scheme(fields["audioBaseUrl"]) not in _WS_SCHEMES:
            raise CallsError(
                f"{where}: response audioBaseUrl is not a ws(s):// or http(s):// URL", status=status, permanent=False
            )
        return CallGrant(
            token=fields["token"],
            room_name=fields["roomName"],
            caller_id=fields["callerId"],
            audio_base_url=fields["audioBaseUrl"],
        )
    raise _refused(CallsError, where, status, parsed, _CALLS_STATUS_CAUSES, retry_after_s)


def accept_response(token: str, room_name: str, caller_id: str, audio_base_url: str) -> bytes:
    """JSON body of a successful Calls Accept response (listen side):
    ``{"token", "roomName", "callerId", "audioBaseUrl"}``."""
    return json.dumps(
        {"token": token, "roomName": room_name, "callerId": caller_id, "audioBaseUrl": audio_base_url},
        separators=(",", ":"),
    ).encode()


def reject_request(call_id: str, reason: str | None = None) -> dict[str, str]:
    """JSON body of ``POST {api}/ICalls/v20260401/Reject``: ``{"callId"[, "reason"]}`` (the
    reason only when given and non-empty)."""
    if not call_id:
        raise LocalProtocolError("call_id must be non-empty")
    body = {"callId": call_id}
    if reason:
        body["reason"] = reason
    return body


def parse_reject_response(
    status: int, body: bytes, *, call_id: str, retry_after_s: float | None = None
) -> None:
    """Check a Calls Reject response: None on 2xx, else `CallsError` with the error table of
    `parse_accept_response`. A 2xx whose JSON body says ``{"rejected": false}`` (the manifest's
    response shape) raises a permanent `CallsError` "call was not rejected"; any other 2xx
    body, empty included, is success."""
    where = f"Argon Calls Reject (call {call_id})"
    parsed = _parse_body(body)
    if 200 <= status < 300:
        if isinstance(parsed, dict) and parsed.get("rejected") is False:
            raise CallsError(f"{where}: call was not rejected (HTTP {status})", status=status, permanent=True)
        return None
    raise _refused(CallsError, where, status, parsed, _CALLS_STATUS_CAUSES, retry_after_s)


@attrs.frozen
class BotSelf:
    """A GetMe response: who the bot token belongs to."""

    bot_id: str
    """``botId``: the bot application's id ("" when absent)."""
    user_id: str
    """``userId``: the bot's user GUID, its identity in rooms (required)."""
    username: str
    """``username``: ends in "_bot" ("" when absent)."""
    display_name: str
    """``displayName`` ("" when absent)."""


def parse_get_me_response(status: int, body: bytes, *, retry_after_s: float | None = None) -> BotSelf:
    """The bot from a GetMe response, or `BotSelfError` (a `ServiceError`).

    2xx ``{"botId", "userId", "username", "displayName"}``: ``userId`` required (a 2xx
    without it, or not a JSON object → not permanent); the others default to "" when absent
    or not strings. Errors: 401 "bot token rejected" (permanent), 429 "rate limited" (not
    permanent, `retry_after` as in `parse_accept_response`), 408/5xx not permanent, other 4xx
    permanent; the server's own cause quoted, scrubbed of token-like text.
    """
    where = "Argon GetMe"
    parsed = _parse_body(body)
    if 200 <= status < 300:
        fields = _required_strings(BotSelfError, where, status, parsed, ("userId",))
        def text(key: str) -> str:
            value = parsed.get(key)
            return value if isinstance(value, str) else ""
        return BotSelf(
            bot_id=text("botId"), user_id=fields["userId"], username=text("username"), display_name=text("displayName")
        )
    raise _refused(BotSelfError, where, status, parsed, _GET_ME_STATUS_CAUSES, retry_after_s)


def get_me_response(bot: BotSelf) -> bytes:
    """JSON body of a GetMe response (listen side): ``{"botId", "userId", "username",
    "displayName"}``."""
    return json.dumps(
        {"botId": bot.bot_id, "userId": bot.user_id, "username": bot.username, "displayName": bot.display_name},
        separators=(",", ":"),
    ).encode()


def api_error_body(code: str, message: str) -> bytes:
    """Argon's bot API error body (listen side): ``{"error": "<code>", "message": "…"}``
    (e.g. ``not_voice_channel``, ``not_callee``), served as `API_ERROR_CONTENT_TYPE`. The
    parse functions above quote it back. Never put a token in `message`."""
    if not code:
        raise LocalProtocolError("error code must be non-empty")
    return json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()
