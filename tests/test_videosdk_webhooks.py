"""VideoSDK lifecycle webhooks (gateway/adapters/videosdk/webhooks.py): ``videosdk-signature``
checks and bodies, no event loop.

Spec: /work/shared/protocols/004_c69f0f37162481c1.txt ("Lifecycle Webhooks").
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gateway.adapters.videosdk.webhooks import (
    WEBHOOK_SIGNATURE_HEADER,
    WebhookPayloadError,
    WebhookSignatureError,
    load_webhook_key,
    sign_webhook,
    verify_webhook,
    webhook_body,
    webhook_event,
)
from gateway.errors import GatewayError, LocalProtocolError


def test_signature_header_name():
    assert WEBHOOK_SIGNATURE_HEADER == "videosdk-signature"


@pytest.fixture(scope="module")
def keys():
    """(private key, public PEM, another public PEM) generated for this test run."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = lambda key: key.public_key().public_bytes(  # noqa: E731
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, pem(private), pem(other)


def rsa_sign(private, body: bytes) -> str:
    """What VideoSDK does: base64 of RSA-SHA256 (PKCS#1 v1.5), computed here by cryptography."""
    return base64.b64encode(private.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


HANGUP = b'{"webhookType":"call-hangup","data":{"callId":"550e8400-e29b-41d4-a716-446655440000","reason":"normal"}}'


def test_verify_webhook_accepts_a_signed_body(keys):
    private, public_pem, _ = keys
    payload = verify_webhook(HANGUP, rsa_sign(private, HANGUP), public_pem)
    assert payload == json.loads(HANGUP)
    assert webhook_event(payload) == ("call-hangup", "550e8400-e29b-41d4-a716-446655440000")
    # A pre-loaded key and a str PEM work the same.
    assert verify_webhook(HANGUP, rsa_sign(private, HANGUP), load_webhook_key(public_pem.decode())) == payload


def test_verify_webhook_refuses_a_tampered_body(keys):
    private, public_pem, _ = keys
    signature = rsa_sign(private, HANGUP)
    tampered = HANGUP.replace(b"call-hangup", b"call-started")
    with pytest.raises(WebhookSignatureError) as info:
        verify_webhook(tampered, signature, public_pem)
    assert info.value.cause == "bad-signature"
    assert signature not in str(info.value)


def test_verify_webhook_refuses_another_key(keys):
    private, _, other_pem = keys
    with pytest.raises(WebhookSignatureError) as info:
        verify_webhook(HANGUP, rsa_sign(private, HANGUP), other_pem)
    assert info.value.cause == "bad-signature"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_verify_webhook_refuses_a_missing_signature(keys, header):
    with pytest.raises(WebhookSignatureError, match="no videosdk-signature header") as info:
        verify_webhook(HANGUP, header, keys[1])
    assert info.value.cause == "missing"
    assert isinstance(info.value, GatewayError)


@pytest.mark.parametrize("header", ["not base64!", "QUJ", "QUJD RA=="])
def test_verify_webhook_refuses_a_signature_that_is_not_base64(keys, header):
    with pytest.raises(WebhookSignatureError, match="not base64") as info:
        verify_webhook(HANGUP, header, keys[1])
    assert info.value.cause == "not-base64"


def test_verify_webhook_refuses_a_bad_key(keys):
    private, _, _ = keys
    signature = rsa_sign(private, HANGUP)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for bad, fragment in ((b"garbage", "not a PEM public key"), (private_pem, "not a PEM public key"),
                          (ec_pem, "not an RSA key")):
        with pytest.raises(WebhookSignatureError, match=fragment) as info:
            verify_webhook(HANGUP, signature, bad)
        assert info.value.cause == "bad-key"


def test_verify_webhook_accepts_json_stringify_signatures(keys):
    """VideoSDK's sample verifies JSON.stringify(req.body): a body re-spaced in transit still passes."""
    private, public_pem, _ = keys
    spaced = b'{\n  "webhookType": "call-answered",\n  "data": {"callId": "c1", "name": "Caf\xc3\xa9"}\n}'
    compact = json.dumps(json.loads(spaced), separators=(",", ":"), ensure_ascii=False).encode()
    assert compact != spaced
    payload = verify_webhook(spaced, rsa_sign(private, compact), public_pem)
    assert webhook_event(payload) == ("call-answered", "c1")
    with pytest.raises(WebhookSignatureError):  # the content itself still has to match
        verify_webhook(spaced.replace(b"c1", b"c2"), rsa_sign(private, compact), public_pem)


def test_verified_body_that_is_not_an_object(keys):
    private, public_pem, _ = keys
    for body in (b"[1,2]", b"not json"):
        with pytest.raises(WebhookPayloadError):
            verify_webhook(body, rsa_sign(private, body), public_pem)


def test_sign_webhook_verifies_with_cryptography(keys):
    private, _, _ = keys
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = webhook_body("call-started", "c9", direction="inbound")
    assert json.loads(body) == {"webhookType": "call-started", "data": {"callId": "c9", "direction": "inbound"}}
    signature = sign_webhook(body, private_pem)
    private.public_key().verify(base64.b64decode(signature), body, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(LocalProtocolError):
        sign_webhook(body, b"garbage")


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"webhookType": "call-hangup", "data": {"callId": "c1"}}, ("call-hangup", "c1")),
        ({"event": "call-started", "callId": "c2"}, ("call-started", "c2")),
        ({"type": "call-answered", "data": {"call_id": "c3"}}, ("call-answered", "c3")),
        ({"webhookType": "session-ended", "data": {"meetingId": "m"}}, ("session-ended", None)),
    ],
)
def test_webhook_event_shapes(payload, expected):
    assert webhook_event(payload) == expected


@pytest.mark.parametrize("payload", [{}, {"data": {"callId": "c"}}, {"webhookType": 5}, []])
def test_webhook_event_without_a_name(payload):
    with pytest.raises(WebhookPayloadError):
        webhook_event(payload)
