"""VideoSDK custom WebSocket ingest, sans-IO: JSON text frames in, events out; audio in, text out.

Source: /work/shared/protocols/004_c69f0f37162481c1.txt ("Custom WebSocket": How It Works,
Step 1 "Create an Ingest Session", Step 2 "Connect and Stream", Messaging, Lifecycle Webhooks,
Troubleshooting, API Reference). The spec links its runnable example,
videosdk-live/videosdk-socket-ingest-example (app.js); where the spec is silent, that example
is the second source and is cited as "the example".

The flow (dial = `IngestClient`, listen = `IngestServer`):

1. The backend calls ``POST https://api.videosdk.live/v2/ingest/sessions`` (`SESSIONS_PATH`,
   `session_request`, `authorization_header`) → ``{"message": "Ingest session created",
   "data": {"wsUrl", "callId", "expiresIn": 90}}`` (`parse_session_response`; the listen side
   reads the request with `parse_session_request` and answers with `session_response` or
   `error_body`). The wsUrl's ``ref`` query parameter is a single-use claim, valid 90 s
   (`SESSION_EXPIRES_S`).
2. The device opens the wsUrl and sends ``{"event":"start"}`` within 5 s (`START_TIMEOUT_S`), or
   the server closes with 1008 "start timeout" (`START_TIMEOUT_CLOSE_CODE`,
   `START_TIMEOUT_REASON`). The server pings every 30 s (`PING_INTERVAL_S`).
3. Both sides send ``{"event":"media","payload":"<base64 PCM16-LE>"}``: signed 16-bit
   little-endian PCM, 8 kHz mono, 20 ms = 160 samples = 320 bytes = 428 base64 characters
   (`FRAME_BYTES`, `FRAME_BASE64_CHARS`).
4. Pub/sub on the same socket: ``subscribe`` / ``unsubscribe`` ``{"topic"}``; publishing is a
   ``{"event":"message","topic","data"}`` frame whose ``data`` is a string or any JSON value
   (JSON values are serialized before delivery); delivery to subscribers is a ``message``
   frame whose ``data`` is an object ``{"message", "senderId", "senderName", "timestamp",
   "id"}``. Topic: non-empty, at most 128 characters; payload at most 8 KB of UTF-8.
5. ``{"event":"stop"}`` (or closing the socket) ends the session.

Frames we build are compact JSON (``JSON.stringify`` style: no spaces, non-ASCII unescaped),
e.g. ``{"event":"start"}``. Frames we parse may use any JSON spacing.

Spec ambiguities and the choices made
-------------------------------------
- **Topic length** "up to 128 characters": counted in UTF-16 code units, as JavaScript's
  ``topic.length`` counts them (VideoSDK's examples are Node.js); identical to code points for
  every character of the Basic Multilingual Plane, while an emoji counts 2. So 128 "a" pass,
  129 do not, and 64 emoji pass while 65 do not.
- **Payload size** "up to 8 KB (UTF-8)": 8 KB is taken as 8192 bytes (`MAX_PAYLOAD_BYTES`) of
  the UTF-8 encoding of the string subscribers receive: the ``data`` string itself, or for
  any other JSON value its compact serialization (what "JSON values are serialized before
  delivery" produces).
- **Refused pub/sub on the listen side**: the spec says "A failed subscribe or publish never
  drops the call", so an empty or too long topic or a too large payload is *not* a
  `RemoteProtocolError`: `IngestServer.receive` returns a `MessagingRefused` event carrying
  the close code a strict server would use (1008 topic rule, 1009 payload too big, 1007 text
  that is not valid Unicode). A frame whose fields have the wrong JSON types (topic not a
  string, no data) is malformed, not a failed publish: 1007.
- **Refused publish on the dial side**: `IngestClient.publish` raises `PublishRefused`, a
  `LocalProtocolError` subclass (the data came from our side). It is the one
  `LocalProtocolError` an adapter should expect in normal operation: it carries application
  data, so catch it, report it to whoever published, and keep the call.
- **Lifecycle events** (``participant-joined``, ``participant-left`` with ``participant: {id,
  name, metadata}``; ``meeting-joined`` with ``roomId``, ``sessionId``; ``meeting-left`` with
  an optional ``message``): not in the spec text, only in the example. They are parsed
  leniently (a field of the wrong type reads as None; `raw` keeps the frame) and never close
  the stream. The spec defines no error frame; any event we do not know is `Unknown`.
- **Odd-length audio**: a media payload whose byte count is odd carries its last byte over to
  the next media frame (prepended), so samples stay aligned if a peer splits a sample across
  frames; `Media.pcm` always holds whole samples. (The example's decoder drops the byte.)
- **Order on the listen side**: before the start frame anything else closes with 1008 and a
  reason naming what came instead (the same code as the start timeout: the client did not
  start; the Troubleshooting table maps 1008 to "no start frame"). A second start is 1002.
  Frames after stop are ignored (a client's last media may cross its stop).
- **Session authorization**: the spec's curl sends ``Authorization: Bearer <token>``; the
  example and VideoSDK's other REST APIs send the bare token. We send ``Bearer``
  (`authorization_header`); the listen side accepts both (`parse_authorization`).
- **Webhooks**: the spec defers bodies to the SIP webhooks page, which lists event names
  (``call-started``, ``call-answered``, ``call-hangup``, ...) but shows no body. VideoSDK's
  other webhooks use ``{"webhookType": name, "data": {...}}``; `webhook_event` reads that
  envelope and also a top-level ``event`` / ``type``, with ``callId`` in ``data`` or at the top
  level. The signature (``videosdk-signature``: base64 RSA-SHA256, PKCS#1 v1.5) is checked
  over the raw body; VideoSDK's verification sample (docs "Webhook Verification - API")
  verifies ``JSON.stringify(req.body)`` instead, so a body that fails the raw check is checked
  once more in that compact re-serialized form. Use the dict `verify_webhook` returns, never a
  second parse of the raw body.

Errors (`RemoteProtocolError.close_code`, RFC 6455 §7.4.1)
----------------------------------------------------------
- 1003: a binary message (every frame is JSON text).
- 1007: not JSON (NaN / Infinity included), not a JSON object, ``event`` missing or not a
  string, media ``payload`` missing, not a string or not valid base64 (standard alphabet,
  padded, no whitespace), topic not a string, a ``message`` frame without ``data``, a
  delivered message whose ``data`` is neither a string nor an object with a string
  ``message``.
- 1008: (listen) any frame other than start before the start frame; the start timeout itself
  is the adapter's (`START_TIMEOUT_S`, `START_TIMEOUT_CLOSE_CODE`, `START_TIMEOUT_REASON`).
- 1009: a text message over `MAX_MESSAGE_BYTES` (64 KiB of UTF-8).
- 1002: (listen) a second start frame.

`str(err)` is the close reason, at most 123 bytes of UTF-8; peer-supplied strings in it are
shortened. "If this raises anything but RemoteProtocolError, that's a bug" (h11), except
`LocalProtocolError` when the adapter passes something that is neither str nor bytes.

Secrets: the REST token is never stored or put in a message here; `IngestSession` keeps its
wsUrl (which holds the single-use ref) out of `repr`, and no error message contains a wsUrl,
a ref, a response body or a signature.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.adapters.rest import loads_strict
from gateway.adapters.videosdk.frames import (
    FRAME_BASE64_CHARS,
    FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PCM_BYTES,
    MAX_TOPIC_LENGTH,
    MEETING_JOINED,
    MEETING_LEFT,
    PARTICIPANT_JOINED,
    PARTICIPANT_LEFT,
    PING_INTERVAL_S,
    PTIME_MS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    START_TIMEOUT_CLOSE_CODE,
    START_TIMEOUT_REASON,
    START_TIMEOUT_S,
    ClientEvent,
    IngestClient,
    IngestServer,
    Media,
    MeetingJoined,
    MeetingLeft,
    Message,
    MessagingRefused,
    ParticipantJoined,
    ParticipantLeft,
    Publish,
    PublishRefused,
    ServerEvent,
    Started,
    Stopped,
    Subscribe,
    Unknown,
    Unsubscribe,
    _dumps,
    _encode_frame,
)
from gateway.adapters.videosdk.sessions import (
    API_BASE_URL,
    INGEST_PATH,
    SESSION_CREATED_MESSAGE,
    SESSION_EXPIRES_S,
    SESSIONS_PATH,
    IngestSession,
    SessionError,
    SessionRequest,
    SessionRequestError,
    authorization_header,
    error_body,
    ingest_url,
    parse_authorization,
    parse_ingest_ref,
    parse_session_request,
    parse_session_response,
    session_request,
    session_response,
)
from gateway.errors import GatewayError, LocalProtocolError

__all__ = [
    "API_BASE_URL",
    "ClientEvent",
    "FRAME_BASE64_CHARS",
    "FRAME_BYTES",
    "INGEST_PATH",
    "IngestClient",
    "IngestServer",
    "IngestSession",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_PCM_BYTES",
    "MAX_TOPIC_LENGTH",
    "MEETING_JOINED",
    "MEETING_LEFT",
    "Media",
    "MeetingJoined",
    "MeetingLeft",
    "Message",
    "MessagingRefused",
    "PARTICIPANT_JOINED",
    "PARTICIPANT_LEFT",
    "PING_INTERVAL_S",
    "PTIME_MS",
    "ParticipantJoined",
    "ParticipantLeft",
    "Publish",
    "PublishRefused",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "SESSIONS_PATH",
    "SESSION_CREATED_MESSAGE",
    "SESSION_EXPIRES_S",
    "START_TIMEOUT_CLOSE_CODE",
    "START_TIMEOUT_REASON",
    "START_TIMEOUT_S",
    "ServerEvent",
    "SessionError",
    "SessionRequest",
    "SessionRequestError",
    "Started",
    "Stopped",
    "Subscribe",
    "Unknown",
    "Unsubscribe",
    "WEBHOOK_PUBLIC_KEY_URL",
    "WEBHOOK_SIGNATURE_HEADER",
    "WebhookPayloadError",
    "WebhookSignatureError",
    "authorization_header",
    "error_body",
    "ingest_url",
    "load_webhook_key",
    "parse_authorization",
    "parse_ingest_ref",
    "parse_session_request",
    "parse_session_response",
    "session_request",
    "session_response",
    "sign_webhook",
    "verify_webhook",
    "webhook_body",
    "webhook_event",
]

# --- constants -----------------------------------------------------------------------------

WEBHOOK_SIGNATURE_HEADER = "videosdk-signature"  # base64 RSA-SHA256 signature of the body
#: Where VideoSDK publishes its webhook RSA public key (docs "Webhook Verification - API").
WEBHOOK_PUBLIC_KEY_URL = "https://api.videosdk.live/v2/public/rsa-public-key"

# --- webhooks -------------------------------------------------------------------------------


class WebhookSignatureError(GatewayError):
    """A webhook's ``videosdk-signature`` does not prove it came from VideoSDK.

    `cause`: "missing" (no header), "not-base64" (the header is not base64), "bad-signature"
    (it does not verify over the body), "bad-key" (our configured key is not an RSA public key
    in PEM: a configuration error, answer 500 rather than 401). The message names the cause,
    never the signature or the body."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class WebhookPayloadError(GatewayError):
    """A verified webhook body is not a JSON object, or names no event (`webhook_event`)."""


def load_webhook_key(public_key_pem: bytes | str | rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    """VideoSDK's webhook public key (PEM, from `WEBHOOK_PUBLIC_KEY_URL`) as an RSA key object;
    load it once and pass the object to `verify_webhook`. Raises `WebhookSignatureError`
    (cause "bad-key")."""
    if isinstance(public_key_pem, rsa.RSAPublicKey):
        return public_key_pem
    data = public_key_pem.encode("ascii", "replace") if isinstance(public_key_pem, str) else public_key_pem
    try:
        key = serialization.load_pem_public_key(bytes(data))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise WebhookSignatureError("webhook public key is not a PEM public key", cause="bad-key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise WebhookSignatureError("webhook public key is not an RSA key", cause="bad-key")
    return key


def _rsa_verifies(key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def verify_webhook(
    body: bytes, signature_b64: str | None, public_key_pem: bytes | str | rsa.RSAPublicKey
) -> dict[str, Any]:
    """Check a webhook's ``videosdk-signature`` header and return its JSON body.

    The signature is base64 (whitespace around it ignored) of RSA-SHA256, PKCS#1 v1.5, over
    the raw `body`; if that fails and the body is JSON, over its compact re-serialization
    (what VideoSDK's Node.js sample verifies: ``JSON.stringify(req.body)``). Raises
    `WebhookSignatureError` with cause "bad-key", "missing", "not-base64" or "bad-signature"
    (checked in that order), and `WebhookPayloadError` when a verified body is not a JSON
    object. No timestamp is signed, so replays cannot be detected here (dedupe on callId and
    event if that matters)."""
    key = load_webhook_key(public_key_pem)
    if signature_b64 is None or not signature_b64.strip():
        raise WebhookSignatureError(f"webhook has no {WEBHOOK_SIGNATURE_HEADER} header", cause="missing")
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSignatureError(f"webhook {WEBHOOK_SIGNATURE_HEADER} is not base64", cause="not-base64") from None
    body = bytes(body)
    try:
        parsed: Any = loads_strict(body)
        is_json = True
    except (ValueError, RecursionError):
        parsed, is_json = None, False
    verified = _rsa_verifies(key, signature, body)
    if not verified and is_json:
        try:
            compact = _dumps(parsed).encode("utf-8")
        except (ValueError, RecursionError):
            compact = body
        verified = compact != body and _rsa_verifies(key, signature, compact)
    if not verified:
        raise WebhookSignatureError(
            f"webhook {WEBHOOK_SIGNATURE_HEADER} does not verify over the body", cause="bad-signature"
        )
    if not isinstance(parsed, dict):
        raise WebhookPayloadError("verified webhook body is not a JSON object")
    return parsed


def sign_webhook(body: bytes, private_key_pem: bytes) -> str:
    """The ``videosdk-signature`` value for `body` (listen side and tests): base64 of
    RSA-SHA256, PKCS#1 v1.5, with an unencrypted PEM RSA private key. Raises
    `LocalProtocolError` for any other key."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise LocalProtocolError("webhook signing key is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise LocalProtocolError("webhook signing key is not an RSA key")
    return base64.b64encode(key.sign(bytes(body), padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def webhook_body(event: str, call_id: str, **data: Any) -> bytes:
    """A lifecycle webhook body (listen side) in VideoSDK's webhook envelope:
    ``{"webhookType": event, "data": {"callId": call_id, **data}}``, compact JSON, which
    `webhook_event` reads. Event names: ``call-started``, ``call-answered``, ``call-hangup``,
    ... (SIP webhooks list)."""
    if not isinstance(event, str) or not event or not isinstance(call_id, str) or not call_id:
        raise LocalProtocolError("webhook_body needs a non-empty event name and callId")
    return _encode_frame({"webhookType": event, "data": {"callId": call_id, **data}}, "webhook").encode("utf-8")


def webhook_event(payload: dict[str, Any]) -> tuple[str, str | None]:
    """(event name, callId) of a verified webhook body.

    The name is the first string among ``webhookType`` (VideoSDK's envelope), ``event`` and
    ``type``; the call id the first string among ``data.callId``, ``callId``,
    ``data.call_id`` and ``call_id`` (None when there is none: not every webhook is about an
    ingest call). Raises `WebhookPayloadError` when no event name is found."""
    if not isinstance(payload, dict):
        raise WebhookPayloadError("webhook body is not a JSON object")
    names = (payload.get("webhookType"), payload.get("event"), payload.get("type"))
    name = next((value for value in names if isinstance(value, str) and value), None)
    if name is None:
        raise WebhookPayloadError("webhook body names no event (webhookType, event or type)")
    data = payload.get("data")
    data = data if isinstance(data, dict) else {}
    candidates = (data.get("callId"), payload.get("callId"), data.get("call_id"), payload.get("call_id"))
    call_id = next((value for value in candidates if isinstance(value, str) and value), None)
    return name, call_id
