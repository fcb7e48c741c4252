"""VideoSDK ingest sessions REST shapes (gateway/adapters/videosdk/sessions.py): ``POST
/v2/ingest/sessions`` request and response for both sides, the wsUrl ref, Authorization; no
event loop.

Spec: /work/shared/protocols/004_c69f0f37162481c1.txt. Examples marked "spec" are copied from it
with their original spacing; bodies we build are compared as exact strings.
"""

from __future__ import annotations

import json

import pytest

from gateway.adapters.videosdk.sessions import (
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
from gateway.errors import LocalProtocolError, ServiceError

# --- spec examples, verbatim -----------------------------------------------------------------

SPEC_SESSION_REQUEST = """{
"roomId": "abcd-efgh-ijkl",
"participant": {
"name": "Field Device 12",
"metadata": { "deviceId": "dev_12" }
}
}"""

SPEC_SESSION_RESPONSE = """{
"message": "Ingest session created",
"data": {
"wsUrl": "wss://ingest.videosdk.live/videosdk?ref=vs_k9d8j2m4x7p1w5v3r6u0",
"callId": "550e8400-e29b-41d4-a716-446655440000",
"expiresIn": 90
}
}"""
SPEC_REF = "vs_k9d8j2m4x7p1w5v3r6u0"


def test_constants_from_the_spec():
    assert SESSION_EXPIRES_S == 90
    assert SESSIONS_PATH == "/v2/ingest/sessions"


def test_session_request_is_the_spec_example():
    participant = {"name": "Field Device 12", "metadata": {"deviceId": "dev_12"}}
    body = session_request("abcd-efgh-ijkl", participant=participant)
    assert body == json.loads(SPEC_SESSION_REQUEST)
    assert session_request("r") == {"roomId": "r"}
    full = session_request("r", {"id": "p"}, {"id": "agent-1", "metadata": {"lang": "en"}}, "us002")
    assert full == {
        "roomId": "r",
        "participant": {"id": "p"},
        "agent": {"id": "agent-1", "metadata": {"lang": "en"}},
        "region": "us002",
    }


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"room_id": ""}, "roomId"),
        ({"room_id": "r", "agent": {"metadata": {}}}, "agent.id is required"),
        ({"room_id": "r", "agent": {"id": ""}}, "agent.id"),
        ({"room_id": "r", "participant": {"metadata": "x"}}, "participant.metadata"),
        ({"room_id": "r", "participant": {"name": 5}}, "participant.name"),
        ({"room_id": "r", "participant": "Bob"}, "participant must be an object"),
        ({"room_id": "r", "region": ""}, "region"),
    ],
)
def test_session_request_names_the_bad_field(kwargs, fragment):
    with pytest.raises(LocalProtocolError, match=fragment):
        session_request(**kwargs)
    body = {"roomId": kwargs["room_id"], **{k: v for k, v in kwargs.items() if k != "room_id"}}
    with pytest.raises(SessionRequestError, match=fragment) as info:
        parse_session_request(json.dumps(body).encode())
    assert info.value.status == 400


def test_parse_session_request_round_trip():
    assert parse_session_request(SPEC_SESSION_REQUEST.encode()) == SessionRequest(
        "abcd-efgh-ijkl", {"name": "Field Device 12", "metadata": {"deviceId": "dev_12"}}, None, None
    )
    with pytest.raises(SessionRequestError, match="not JSON"):
        parse_session_request(b"roomId=r")
    with pytest.raises(SessionRequestError, match="object"):
        parse_session_request(b'["r"]')


def test_parse_session_response_spec_example():
    session = parse_session_response(201, SPEC_SESSION_RESPONSE.encode())
    assert session == IngestSession(
        ws_url=f"wss://ingest.videosdk.live/videosdk?ref={SPEC_REF}",
        call_id="550e8400-e29b-41d4-a716-446655440000",
        expires_in=90,
    )
    assert SPEC_REF not in repr(session)  # the single-use claim stays out of logs
    assert "550e8400" in repr(session)
    assert parse_ingest_ref(session.ws_url) == SPEC_REF


def test_session_response_is_the_spec_shape_and_round_trips():
    ws = f"wss://ingest.videosdk.live/videosdk?ref={SPEC_REF}"
    body = session_response(ws, "550e8400-e29b-41d4-a716-446655440000")
    assert json.loads(body) == json.loads(SPEC_SESSION_RESPONSE)
    assert parse_session_response(200, body).ws_url == ws


def test_expires_in_defaults_to_90():
    body = json.dumps({"data": {"wsUrl": "ws://h/videosdk?ref=x", "callId": "c"}}).encode()
    assert parse_session_response(200, body).expires_in == 90


@pytest.mark.parametrize(
    "status, cause, permanent",
    [
        (400, "bad request", True),
        (401, "token rejected", True),
        (403, "token rejected", True),
        (404, "room not found", True),
        (418, "request refused", True),
        (408, "timed out", False),
        (429, "rate limited", False),
        (500, "service error", False),
        (503, "service error", False),
        (302, "unexpected response", False),
    ],
)
def test_session_errors_by_status(status, cause, permanent):
    with pytest.raises(SessionError) as info:
        parse_session_response(status, b'{"message":"nope"}', room_id="abcd-efgh-ijkl")
    err = info.value
    assert isinstance(err, ServiceError)
    assert (err.status, err.permanent) == (status, permanent)
    assert cause in str(err) and f"HTTP {status}" in str(err) and "abcd-efgh-ijkl" in str(err)


def test_rate_limit_retry_after_from_header_or_body():
    with pytest.raises(SessionError) as info:
        parse_session_response(429, b"", retry_after_s=7)
    assert info.value.retry_after == 7 and "retry after 7 s" in str(info.value)
    with pytest.raises(SessionError) as info:
        parse_session_response(429, b'{"retryAfter": 2.5}')
    assert info.value.retry_after == 2.5 and not info.value.permanent
    with pytest.raises(SessionError) as info:
        parse_session_response(429, b"{}")
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    "body, field",
    [
        (b"<html>", "not a JSON object"),
        (b"[]", "not a JSON object"),
        (b'{"message":"Ingest session created"}', "no data object"),
        (b'{"data":{"callId":"c"}}', "data.wsUrl"),
        (b'{"data":{"wsUrl":"https://h/videosdk?ref=x","callId":"c"}}', "data.wsUrl"),
        (b'{"data":{"wsUrl":"wss://h/videosdk?ref=x"}}', "data.callId"),
        (b'{"data":{"wsUrl":"wss://h/videosdk?ref=x","callId":7}}', "data.callId"),
        (b'{"data":{"wsUrl":"wss://h/videosdk?ref=x","callId":"c","expiresIn":"90"}}', "data.expiresIn"),
    ],
)
def test_session_response_missing_fields_are_named(body, field):
    with pytest.raises(SessionError) as info:
        parse_session_response(200, body)
    assert field in str(info.value)
    assert info.value.permanent is False


def test_session_errors_never_contain_the_token_or_the_ref():
    token = "eyJhbGciOiJIUzI1NiJ9.secret-token.sig"
    with pytest.raises(SessionError) as info:
        parse_session_response(401, json.dumps({"message": f"invalid token {token}"}).encode())
    assert token not in str(info.value) and token not in repr(info.value)
    with pytest.raises(SessionError) as info:
        body = {"data": {"wsUrl": f"https://h/?ref={SPEC_REF}", "callId": "c"}}
        parse_session_response(200, json.dumps(body).encode())
    assert SPEC_REF not in str(info.value)
    with pytest.raises(LocalProtocolError) as info:
        authorization_header("secret token")
    assert "secret" not in str(info.value)


def test_authorization_header_and_parse():
    assert authorization_header("tok.en") == "Bearer tok.en"
    assert parse_authorization(authorization_header("tok.en")) == "tok.en"
    with pytest.raises(LocalProtocolError):
        authorization_header("")
    with pytest.raises(LocalProtocolError):
        authorization_header("a\r\nX-Injected: 1")


@pytest.mark.parametrize(
    "value, token",
    [
        ("Bearer abc.def", "abc.def"),
        ("bearer abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        ("abc.def", "abc.def"),  # bare token, as the example and VideoSDK's REST APIs send it
        (None, None),
        ("", None),
        ("   ", None),
        ("Bearer", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer a b", None),
    ],
)
def test_parse_authorization(value, token):
    assert parse_authorization(value) == token


def test_parse_authorization_other_scheme():
    assert parse_authorization("Bot xyz", scheme="Bot") == "xyz"
    assert parse_authorization("Bearer xyz", scheme="Bot") is None


def test_ingest_url_and_ref():
    url = ingest_url("wss://gw.example/videosdk", "vs_abc")
    assert url == "wss://gw.example/videosdk?ref=vs_abc"
    assert parse_ingest_ref(url) == "vs_abc"
    assert parse_ingest_ref("/videosdk?ref=vs_abc&x=1") == "vs_abc"
    assert ingest_url("ws://h:8080/v?k=1", "a b") == "ws://h:8080/v?k=1&ref=a%20b"
    assert parse_ingest_ref("/videosdk") is None
    assert parse_ingest_ref("/videosdk?ref=") is None
    assert parse_ingest_ref("/videosdk?ref=a&ref=b") is None
    with pytest.raises(LocalProtocolError):
        ingest_url("https://gw.example/videosdk", "vs_abc")
    with pytest.raises(LocalProtocolError):
        ingest_url("wss://gw.example/videosdk", "")


def test_error_body_shape():
    assert json.loads(error_body("roomId is required")) == {"message": "roomId is required"}
