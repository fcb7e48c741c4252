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

Secrets: no error message, `str()` or `repr()` produced here contains a bot token, a stream JWT
or a JWT secret (`IngressParams` and `StreamTokenGrant` keep their token out of `repr`).
"""

from __future__ import annotations

import enum
import http
import json
import math
import urllib.parse
from typing import Any

import attrs
import jwt

from gateway.adapters.rest import status_cause
from gateway.errors import GatewayError, LocalProtocolError, RemoteProtocolError, ServiceError

__all__ = [
    "ERROR_CONTENT_TYPE",
    "FRAME_DURATIONS_MS",
    "IngressParams",
    "MAX_PACKET_DURATION_MS",
    "OpusMode",
    "OpusPacketInfo",
    "SAMPLE_RATE",
    "STREAM_TOKEN_PATH",
    "STREAM_TOKEN_RATE_PER_MINUTE",
    "STREAM_TOKEN_TTL_S",
    "StreamGrant",
    "StreamTokenError",
    "StreamTokenGrant",
    "TokenError",
    "build_ingress_url",
    "error_body",
    "issue_stream_token",
    "parse_ingress_target",
    "parse_retry_after",
    "parse_stream_token_response",
    "room_name",
    "stream_token_request",
    "stream_token_response",
    "validate_opus_packet",
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
    return RemoteProtocolError(reason, close_code=1007)


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
    return RemoteProtocolError(reason, close_code=1002)


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
        raise RemoteProtocolError("ingress query has no token", close_code=1008)
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
    """A stream JWT was refused: expired, not yet valid, bad signature, malformed, or without
    the room grant. The message names the cause and never contains the token."""


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
) -> str:
    """A stream JWT (HS256) for `identity` in room ``{space_id}/{channel_id}``, valid from
    `now` (seconds since the epoch, floored) for `ttl_s` seconds (default 2 h).

    Claims, as LiveKit access tokens carry them: ``iss`` (`issuer`; LiveKit puts its API key
    here), ``sub`` = identity, ``nbf``, ``exp`` and ``video`` = {room, roomJoin: true,
    canPublish, canSubscribe, canPublishData, canUpdateOwnMetadata: true} (spec: "Bot
    Permissions"). Raises `LocalProtocolError` for an empty secret, identity or id, an id
    containing "/", or a non-positive ttl. Use a secret of at least 32 bytes (RFC 7518 §3.2;
    PyJWT warns otherwise).
    """
    if not secret:
        raise LocalProtocolError("stream token secret is empty")
    if not identity:
        raise LocalProtocolError("stream token identity is empty")
    for name, value in (("space_id", space_id), ("channel_id", channel_id)):
        if not value or "/" in value:
            raise LocalProtocolError(f"{name} must be non-empty and contain no '/'")
    if ttl_s <= 0:
        raise LocalProtocolError(f"ttl_s must be positive, got {ttl_s}")
    issued = int(now)
    claims = {
        "iss": issuer,
        "sub": identity,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "video": {
            "room": room_name(space_id, channel_id),
            "roomJoin": True,
            "canPublish": True,
            "canSubscribe": True,
            "canPublishData": True,
            "canUpdateOwnMetadata": True,
        },
    }
    return jwt.encode(claims, secret, algorithm=_JWT_ALGORITHM)


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if value is None:
        raise TokenError(f"stream token malformed: no {name} claim")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenError(f"stream token malformed: {name} claim is not a number")
    return float(value)


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
    video = claims.get("video")
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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in delta-seconds form (RFC 9110 §10.2.3).

    None when absent or in the HTTP-date form (converting a date needs a clock; the adapter
    may do it)."""
    if value is None:
        return None
    value = value.strip()
    return float(value) if value.isascii() and value.isdigit() else None


def _body_retry_after(body: Any) -> float | None:
    if isinstance(body, dict):
        for key in ("retryAfter", "retry_after", "retry_after_s"):
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                return float(value)
    return None


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
    field) or whose ``ingressUrl`` is not a ws(s):// or http(s):// URL → not permanent. Messages name the space and channel ids when given, never the
    token or the response body.
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
