"""VideoSDK signed lifecycle webhooks: the signature check and body reading (sans-IO), and
the gateway's ``POST /webhooks/videosdk`` endpoint (`VideosdkWebhooks`).

Source: /work/shared/protocols/004_c69f0f37162481c1.txt ("Custom WebSocket": Lifecycle
Webhooks), which defers bodies to VideoSDK's SIP webhooks page; the signature scheme is
VideoSDK's docs "Webhook Verification - API".

Spec ambiguities and the choices made
-------------------------------------
- **Webhooks**: the spec defers bodies to the SIP webhooks page, which lists event names
  (``call-started``, ``call-answered``, ``call-hangup``, ...) but shows no body. VideoSDK's
  other webhooks use ``{"webhookType": name, "data": {...}}``; `webhook_event` reads that
  envelope and also a top-level ``event`` / ``type``, with ``callId`` in ``data`` or at the top
  level. The signature (``videosdk-signature``: base64 RSA-SHA256, PKCS#1 v1.5) is checked
  over the raw body; VideoSDK's verification sample (docs "Webhook Verification - API")
  verifies ``JSON.stringify(req.body)`` instead, so a body that fails the raw check is checked
  once more in that compact re-serialized form. Use the dict `verify_webhook` returns, never a
  second parse of the raw body.

Secrets: no error message or log line contains a signature or a body.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.adapters.rest import loads_strict
from gateway.adapters.videosdk._shared import _refused, _shown, log
from gateway.adapters.videosdk.frames import _dumps, _encode_frame
from gateway.adapters.videosdk.sessions import error_body
from gateway.errors import GatewayError, LocalProtocolError
from gateway.runtime import Runtime
from gateway.server import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from gateway.adapters.videosdk.dial import VideosdkDial

__all__ = [
    "VideosdkWebhooks",
    "WEBHOOK_PATH",
    "WEBHOOK_PUBLIC_KEY_URL",
    "WEBHOOK_SIGNATURE_HEADER",
    "WebhookPayloadError",
    "WebhookSignatureError",
    "load_webhook_key",
    "sign_webhook",
    "verify_webhook",
    "webhook_body",
    "webhook_event",
]

WEBHOOK_SIGNATURE_HEADER = "videosdk-signature"  # base64 RSA-SHA256 signature of the body
#: Where VideoSDK publishes its webhook RSA public key (docs "Webhook Verification - API").
WEBHOOK_PUBLIC_KEY_URL = "https://api.videosdk.live/v2/public/rsa-public-key"
WEBHOOK_PATH = "/webhooks/videosdk"  # POST: lifecycle webhooks (server.http)

# --- signatures and bodies (sans-IO) --------------------------------------------------------


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


# --- the webhook endpoint -------------------------------------------------------------------
class VideosdkWebhooks:
    """``POST /webhooks/videosdk``: VideoSDK lifecycle webhooks (spec: "Lifecycle Webhooks";
    body and signature checks in `verify_webhook` / `webhook_event` above).

    One per process (`for_runtime`), on `server.http`, when
    `services.videosdk.webhook_public_key` is set. Answers: 401 ``{"message"}`` naming the
    signature problem (missing, not base64, does not verify; the signature and body are
    never echoed) and nothing changes; 500 when the configured key is not an RSA public key
    in PEM; 400 for a verified body that is not a JSON object or names no event; 200
    otherwise. A ``call-hangup`` whose callId a running `VideosdkDial` holds ends that
    endpoint; other events for it become route events (``call-answered``, ...); an unknown
    callId is logged and answered 200 (webhooks are retried, so handling is idempotent).
    """

    def __init__(self, runtime: Runtime, public_key_pem: str) -> None:
        self.runtime = runtime
        self.calls: dict[str, VideosdkDial] = {}
        """callId → the dial endpoint streaming that session."""
        self._pem: str | None = None
        self.key: rsa.RSAPublicKey | None = None
        self.key_problem = ""
        self._load_key(public_key_pem)
        self._unregister = runtime.http.add("POST", WEBHOOK_PATH, self.handle, refuse=_refused)

    def _load_key(self, pem: str) -> None:
        self._pem = pem
        self.key, self.key_problem = None, ""
        try:
            self.key = load_webhook_key(pem)
        except WebhookSignatureError as err:
            self.key_problem = str(err)
            log.error("services.videosdk.webhook_public_key: %s; webhooks will be answered 500", err)

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> VideosdkWebhooks | None:
        """The process's webhook endpoint, registered on first use; None when no
        webhook key or no `server.http` is configured."""
        service = runtime.config.services.videosdk
        if not service.webhook_public_key or runtime.config.server.http is None:
            return None
        webhooks: VideosdkWebhooks = runtime.singleton(cls, lambda: cls(runtime, service.webhook_public_key))
        return webhooks

    async def handle(self, request: HttpRequest) -> HttpResponse:
        pem = self.runtime.config.services.videosdk.webhook_public_key
        if not pem:  # removed by a reload
            return HttpResponse(404, error_body("webhooks are not configured (services.videosdk.webhook_public_key)"))
        if pem != self._pem:  # changed by a reload
            self._load_key(pem)
        if self.key is None:
            return HttpResponse(500, error_body(f"webhook key is not usable: {self.key_problem}"))
        try:
            payload = verify_webhook(request.body, request.headers.get(WEBHOOK_SIGNATURE_HEADER), self.key)
            name, call_id = webhook_event(payload)
        except WebhookSignatureError as err:
            log.warning("webhook refused (401, %s): %s", err.cause, err)
            return HttpResponse(401, error_body(f"{err} ({err.cause})"))
        except WebhookPayloadError as err:
            log.warning("webhook refused (400): %s", err)
            return HttpResponse(400, error_body(str(err)))
        endpoint = self.calls.get(call_id) if call_id else None
        if endpoint is None or not call_id:  # (no call_id: no endpoint)
            log.info("webhook %s for call %s: no running endpoint holds it (ignored)",
                     _shown(name), _shown(call_id) if call_id else "(none)")
            return HttpResponse(200, error_body("ignored: no running session has that callId"))
        endpoint.on_webhook(name, call_id)
        return HttpResponse(200, error_body("ok"))
