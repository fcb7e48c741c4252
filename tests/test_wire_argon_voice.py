"""Argon's voice paths as its own server serves them (gateway/adapters/argon/wire.py, the
sections after StreamToken; spec: /work/shared/protocols/argon-voice-ws.md). No event loop."""

from __future__ import annotations

import base64
import json
import urllib.parse

import jwt
import pytest

from gateway.adapters.argon.wire import (
    CALL_TOKEN_TTL_S,
    CALLS_ACCEPT_PATH,
    CALLS_REJECT_PATH,
    EVENTS_PATH,
    GET_ME_PATH,
    INTENT_CALLS,
    INTENT_VOICE,
    STREAM_TOKEN_RATE_PER_MINUTE,
    STREAM_TOKEN_RATE_PER_MINUTE_SERVER,
    STREAM_TOKEN_TTL_S,
    AudioPath,
    AudioRefusal,
    AudioRequest,
    BotSelf,
    BotSelfError,
    CallGrant,
    CallsError,
    RoomGrant,
    StatusMessage,
    TokenError,
    accept_request,
    accept_response,
    api_error_body,
    build_audio_url,
    error_body,
    get_me_response,
    issue_room_token,
    issue_stream_token,
    parse_accept_response,
    parse_audio_request,
    parse_get_me_response,
    parse_reject_response,
    parse_status_message,
    reject_request,
    status_message,
    verify_room_token,
    verify_stream_token,
)
from gateway.errors import GatewayError, LocalProtocolError, RemoteProtocolError, ServiceError

JWT_LIKE = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXNlY3JldA"
BOT_TOKEN = "MTIzNDU2Nzg5.bot-secret-token-value"
SECRET = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t!"  # >= 32 bytes (RFC 7518 §3.2)
SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
CALLER = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
BOT_USER = "9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0"
NOW = 1_800_000_000.25
SECRETS = (JWT_LIKE, BOT_TOKEN, SECRET)


def assert_no_secret(*objects: object) -> None:
    """No secret text in the str() or repr() of any object (errors included)."""
    for obj in objects:
        for text in (str(obj), repr(obj)):
            for secret in SECRETS:
                assert secret not in text, (secret, text)


# --- paths --------------------------------------------------------------------------------


def test_audio_paths():
    assert [p.value for p in AudioPath] == ["/audio/connect", "/audio/subscribe", "/audio/duplex"]
    assert [(p.publishes, p.hears) for p in AudioPath] == [(True, False), (False, True), (True, True)]


# --- parse_audio_request: refusals --------------------------------------------------------


def refusal(target: str, authorization: str | None = None) -> AudioRefusal:
    with pytest.raises(AudioRefusal) as info:
        parse_audio_request(target, authorization)
    err = info.value
    assert isinstance(err, GatewayError)
    assert err.reason == str(err)
    assert_no_secret(err)
    return err


@pytest.mark.parametrize(
    "path", ["/audio", "/audio/connect/", "/AUDIO/CONNECT", "/ingress", "/audio/connectx", "/audio/publish", "//"]
)
def test_unknown_path_is_404(path):
    err = refusal(f"{path}?token={JWT_LIKE}&target_identity={CALLER}")
    assert err.status == 404
    assert str(err) == "404 page not found"  # what Go's ServeMux answers


def test_404_comes_before_the_token_check():
    assert refusal("/nowhere").status == 404


@pytest.mark.parametrize(
    "query, authorization",
    [
        ("", None),
        ("token=", None),
        ("stereo=true", None),
        ("", f"Bot {BOT_TOKEN}"),  # a Bot header is not read
        ("", "Basic dXNlcjpwYXNz"),
        ("", "Bearer"),  # no credentials: not read as a Bearer header, and no query token
        ("", "Bearer   "),
    ],
)
@pytest.mark.parametrize("path", ["/audio/connect", "/audio/duplex", "/"])
def test_missing_token_is_401(path, query, authorization):
    err = refusal(f"{path}?{query}&target_identity={CALLER}", authorization)
    assert err.status == 401
    assert str(err) == "missing authorization token"
    assert_no_secret(err)


@pytest.mark.parametrize("path", ["/audio/subscribe", "/audio/duplex"])
@pytest.mark.parametrize("query", ["", "&target_identity=", "&target_track_source=microphone", "&TARGET_IDENTITY=x"])
def test_hear_paths_need_target_identity(path, query):
    err = refusal(f"{path}?token={JWT_LIKE}{query}")
    assert err.status == 400
    assert "target_identity" in str(err)


def test_target_identity_from_header_token():
    err = refusal("/audio/subscribe", f"Bearer {JWT_LIKE}")
    assert (err.status, str(err)) == (400, "missing target_identity parameter")


@pytest.mark.parametrize(
    "query, fragment",
    [
        ("metadata=%zz", "percent escape"),
        ("metadata=50%", "percent escape"),
        ("metadata=%4", "percent escape"),
        ("track_name=%FF%FE", "UTF-8"),
        ("%C3%28=x", "UTF-8"),
    ],
)
def test_bad_percent_encoding_is_400(query, fragment):
    err = refusal(f"/audio/connect?token={JWT_LIKE}&{query}")
    assert err.status == 400
    assert fragment in str(err)


def test_query_field_limit():
    ok = "&".join([f"token={JWT_LIKE}"] + [f"x{i}=1" for i in range(63)])
    assert parse_audio_request(f"/audio/connect?{ok}", None).token == JWT_LIKE
    err = refusal(f"/audio/connect?{ok}&one=more")
    assert err.status == 400
    assert "64" in str(err)


# --- parse_audio_request: what is read ---------------------------------------------------


def test_connect_defaults():
    req = parse_audio_request(f"/audio/connect?token={JWT_LIKE}", None)
    assert req == AudioRequest(path=AudioPath.CONNECT, token=JWT_LIKE)
    assert (req.legacy, req.token_from_header, req.stereo, req.channels, req.frame_duration_ms) == (
        False, False, False, 1, 20,
    )
    assert (req.track_name, req.track_source, req.metadata) == ("audio", "microphone", "")
    assert (req.target_identity, req.target_track_source) == (None, None)
    assert_no_secret(req)
    assert "audio" in repr(req)


@pytest.mark.parametrize(
    "target",
    [
        f"/?token={JWT_LIKE}&stereo=true&frame_duration_ms=20&track_name=music&track_source=microphone",
        f"ws://ingress.argon.gl:12880?token={JWT_LIKE}&stereo=true&frame_duration_ms=20&track_name=music&track_source=microphone",
        f"ws://ingress.argon.gl:12880/?token={JWT_LIKE}&stereo=true&frame_duration_ms=20&track_name=music&track_source=microphone",
    ],
)
def test_legacy_bare_path_of_the_seed(target):
    # the seed's own example URL (000_…: "ws://ingress.argon.gl:12880?token=TOKEN&stereo=true…")
    req = parse_audio_request(target, None)
    assert req == AudioRequest(
        path=AudioPath.CONNECT, legacy=True, token=JWT_LIKE, stereo=True, track_name="music"
    )


def test_header_token_wins_over_query():
    req = parse_audio_request("/audio/connect?token=from-query", f"Bearer {JWT_LIKE}")
    assert (req.token, req.token_from_header) == (JWT_LIKE, True)
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert parse_audio_request("/audio/connect", f"{scheme} {JWT_LIKE}").token == JWT_LIKE
    req = parse_audio_request(f"/audio/connect?token={JWT_LIKE}", f"Bot {BOT_TOKEN}")
    assert (req.token, req.token_from_header) == (JWT_LIKE, False)  # Bot header ignored
    req = parse_audio_request(f"/audio/connect?token={JWT_LIKE}", None)
    assert req.token_from_header is False
    # a header value is trimmed (as Go's net/http does): "Bearer " has no credentials, so the
    # query is read
    for header in ("Bearer", "Bearer ", "Bearer    "):
        req = parse_audio_request(f"/audio/connect?token={JWT_LIKE}", header)
        assert (req.token, req.token_from_header) == (JWT_LIKE, False)
    assert parse_audio_request("/audio/connect", f"  Bearer   {JWT_LIKE}  ").token == JWT_LIKE
    assert_no_secret(req)


@pytest.mark.parametrize(
    "query, stereo",
    [
        ("stereo=true", True),
        ("stereo=TRUE", False),  # exactly "true"
        ("stereo=True", False),
        ("stereo=1", False),
        ("stereo=yes", False),
        ("stereo=false", False),
        ("channels=2", True),
        ("channels=1", False),
        ("channels=02", False),
        ("stereo=false&channels=2", True),  # either one says stereo
        ("stereo=true&channels=1", True),
        ("stereo=true&stereo=false", True),  # the first value wins
        ("stereo=false&stereo=true", False),
        ("", False),
    ],
)
def test_stereo_rule(query, stereo):
    for path in ("/audio/connect", "/audio/duplex"):
        req = parse_audio_request(f"{path}?token=t&target_identity=x&{query}", None)
        assert req.stereo is stereo
        assert req.channels == (2 if stereo else 1)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, 20),
        ("", 20),
        ("abc", 20),
        ("20.0", 20),
        (" 20", 20),
        ("0x14", 20),
        ("0", 20),
        ("-20", 20),
        ("-0", 20),
        ("10", 10),
        ("40", 40),
        ("60", 60),
        ("+40", 40),  # Go's Atoi takes a sign
        ("020", 20),
        ("30", 30),  # no range check
        ("7", 7),
        ("1000", 1000),
        ("9" * 30, 20),  # out of int64 range: unparseable
    ],
)
def test_frame_duration_rule(raw, expected):
    query = "" if raw is None else "&frame_duration_ms=" + urllib.parse.quote(raw)
    assert parse_audio_request(f"/audio/connect?token=t{query}", None).frame_duration_ms == expected


@pytest.mark.parametrize(
    "query, name, source",
    [
        ("", "audio", "microphone"),
        ("track_name=", "audio", "microphone"),
        ("track_name=music&track_source=screen_share_audio", "music", "screen_share_audio"),
        ("track_source=SCREEN_SHARE_AUDIO", "audio", "microphone"),
        ("track_source=camera", "audio", "microphone"),
        ("track_name=my+music%20%26more", "my music &more", "microphone"),
    ],
)
def test_track_name_and_source_rules(query, name, source):
    req = parse_audio_request(f"/audio/duplex?token=t&target_identity=x&{query}", None)
    assert (req.track_name, req.track_source) == (name, source)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("microphone", "microphone"),
        ("screen_share_audio", "screen_share_audio"),
        ("Microphone", None),
        ("camera", None),
    ],
)
def test_target_track_source_rule(value, expected):
    query = "" if value is None else f"&target_track_source={value}"
    for path in ("/audio/subscribe", "/audio/duplex"):
        req = parse_audio_request(f"{path}?token=t&target_identity={CALLER}{query}", None)
        assert req.target_identity == CALLER
        assert req.target_track_source == expected


def test_paths_read_only_their_parameters():
    everything = (
        f"token={JWT_LIKE}&stereo=true&frame_duration_ms=40&track_name=n&track_source=screen_share_audio"
        f"&metadata=m&target_identity={CALLER}&target_track_source=microphone"
    )
    connect = parse_audio_request(f"/audio/connect?{everything}", None)
    assert connect == AudioRequest(
        path=AudioPath.CONNECT, token=JWT_LIKE, stereo=True, frame_duration_ms=40, track_name="n",
        track_source="screen_share_audio", metadata="m",
    )
    subscribe = parse_audio_request(f"/audio/subscribe?{everything}", None)
    assert subscribe == AudioRequest(
        path=AudioPath.SUBSCRIBE, token=JWT_LIKE, target_identity=CALLER, target_track_source="microphone"
    )
    duplex = parse_audio_request(f"/audio/duplex?{everything}", None)
    assert duplex == AudioRequest(
        path=AudioPath.DUPLEX, token=JWT_LIKE, stereo=True, frame_duration_ms=40, track_name="n",
        track_source="screen_share_audio", metadata="m", target_identity=CALLER, target_track_source="microphone",
    )


def test_reference_bot_duplex_request():
    # echo-bot: token in the query, these four parameters (argon-voice-ws.md "What the reference bot does")
    target = (
        f"/audio/duplex?token={JWT_LIKE}&target_identity={CALLER}&target_track_source=microphone"
        "&stereo=false&frame_duration_ms=20"
    )
    req = parse_audio_request(target, None)
    assert req == AudioRequest(
        path=AudioPath.DUPLEX, token=JWT_LIKE, target_identity=CALLER, target_track_source="microphone"
    )


# --- build_audio_url ---------------------------------------------------------------------


def test_build_audio_url_reference_bot_shape():
    url = build_audio_url(
        "wss://audio.argon.zone", AudioPath.DUPLEX, token=JWT_LIKE,
        target_identity=CALLER, target_track_source="microphone",
    )
    assert url == (
        f"wss://audio.argon.zone/audio/duplex?token={JWT_LIKE}&stereo=false&frame_duration_ms=20"
        f"&target_identity={CALLER}&target_track_source=microphone"
    )


@pytest.mark.parametrize(
    "base, prefix",
    [
        ("ws://ingress.argon.gl:12880", "ws://ingress.argon.gl:12880/audio/connect?"),
        ("ws://ingress.argon.gl:12880/", "ws://ingress.argon.gl:12880/audio/connect?"),
        ("http://ingress.argon.gl:12880", "ws://ingress.argon.gl:12880/audio/connect?"),
        ("https://edge.example/voice", "wss://edge.example/voice/audio/connect?"),
        ("HTTPS://edge.example/voice//", "wss://edge.example/voice/audio/connect?"),
        ("wss://edge.example/v?region=eu", "wss://edge.example/v/audio/connect?region=eu&token=t&"),
    ],
)
def test_build_audio_url_base(base, prefix):
    assert build_audio_url(base, AudioPath.CONNECT, token="t").startswith(prefix)


def test_build_audio_url_publish_parameters():
    url = build_audio_url(
        "ws://i.example", AudioPath.CONNECT, token="t", stereo=True, frame_duration_ms=60,
        track_name="my music & more", track_source="screen_share_audio", metadata="k=v+1/2",
    )
    assert url == (
        "ws://i.example/audio/connect?token=t&stereo=true&frame_duration_ms=60"
        "&track_name=my%20music%20%26%20more&track_source=screen_share_audio&metadata=k%3Dv%2B1%2F2"
    )
    assert build_audio_url("ws://i.example", AudioPath.SUBSCRIBE, token="t", target_identity="x") == (
        "ws://i.example/audio/subscribe?token=t&target_identity=x"
    )


def test_build_audio_url_leaves_out_what_the_path_does_not_read():
    settings = dict(
        stereo=True, frame_duration_ms=40, track_name="n", track_source="microphone", metadata="m",
        target_identity=CALLER, target_track_source="microphone",
    )
    assert build_audio_url("ws://i", AudioPath.SUBSCRIBE, token="t", **settings) == (
        f"ws://i/audio/subscribe?token=t&target_identity={CALLER}&target_track_source=microphone"
    )
    assert build_audio_url("ws://i", AudioPath.CONNECT, token="t", **settings) == (
        "ws://i/audio/connect?token=t&stereo=true&frame_duration_ms=40&track_name=n&track_source=microphone&metadata=m"
    )


@pytest.mark.parametrize(
    "base, path, kwargs, fragment",
    [
        ("ftp://x", AudioPath.CONNECT, {}, "ws://"),
        ("ws://", AudioPath.CONNECT, {}, "host"),
        ("not a url", AudioPath.CONNECT, {}, "host"),
        ("ws://i", AudioPath.CONNECT, {"token": ""}, "token is empty"),
        ("ws://i", AudioPath.SUBSCRIBE, {}, "target_identity"),
        ("ws://i", AudioPath.DUPLEX, {"target_identity": ""}, "target_identity"),
        ("ws://i", AudioPath.CONNECT, {"frame_duration_ms": 0}, "frame_duration_ms"),
        ("ws://i", AudioPath.CONNECT, {"frame_duration_ms": 20.0}, "frame_duration_ms"),
        ("ws://i", AudioPath.CONNECT, {"frame_duration_ms": True}, "frame_duration_ms"),
        ("ws://i", "/audio/connect", {}, "AudioPath"),
    ],
)
def test_build_audio_url_misuse(base, path, kwargs, fragment):
    kwargs = {"token": JWT_LIKE, **kwargs}
    with pytest.raises(LocalProtocolError) as info:
        build_audio_url(f"{base}", path, **kwargs)
    assert fragment in str(info.value)
    assert_no_secret(info.value)


AWKWARD = [
    ("music & friends", "screen_share_audio", '{"a": "b&c=d", "n": 1}', "microphone"),
    ("100% radio + talk", "microphone", "x=y; z?", "screen_share_audio"),
    ("Ünïcødé ☃ #1", "мікрофон", "日本語 / emoji 🎵", None),
    ("", "", "", None),
]


@pytest.mark.parametrize("path", list(AudioPath))
@pytest.mark.parametrize("track_name, track_source, metadata, target_source", AWKWARD)
@pytest.mark.parametrize("stereo, frame_ms", [(False, 10), (True, 20), (True, 40), (False, 60), (False, 120)])
def test_audio_url_round_trip(path, track_name, track_source, metadata, target_source, stereo, frame_ms):
    publish = (
        dict(stereo=stereo, frame_duration_ms=frame_ms, track_name=track_name, track_source=track_source, metadata=metadata)
        if path.publishes else {}
    )
    hear = dict(target_identity=f"{CALLER} & co", target_track_source=target_source) if path.hears else {}
    url = build_audio_url("wss://ingress.argon.gl:12880/", path, token=JWT_LIKE, **publish, **hear)
    assert " " not in url and url.isascii()
    parts = urllib.parse.urlsplit(url)
    expected = AudioRequest(
        path=path,
        token=JWT_LIKE,
        **(
            dict(
                stereo=stereo,
                frame_duration_ms=frame_ms,
                track_name=track_name or "audio",  # the server's reading of an empty name
                track_source="screen_share_audio" if track_source == "screen_share_audio" else "microphone",
                metadata=metadata,
            )
            if path.publishes else {}
        ),
        **hear,
    )
    assert parse_audio_request(url, None) == expected
    assert parse_audio_request(f"{parts.path}?{parts.query}", None) == expected


# --- room tokens --------------------------------------------------------------------------


def decode(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})


def test_issue_room_token_claims():
    token = issue_room_token(
        SECRET, room="call-room-1", identity=BOT_USER, name=BOT_USER, now=NOW, ttl_s=CALL_TOKEN_TTL_S,
        issuer="APIkey", can_publish=False,
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = decode(token)
    assert list(claims) == ["iss", "sub", "name", "nbf", "exp", "video"]
    assert claims == {
        "iss": "APIkey",
        "sub": BOT_USER,
        "name": BOT_USER,
        "nbf": 1_800_000_000,
        "exp": 1_800_000_000 + 3600,
        "video": {
            "room": "call-room-1",
            "roomJoin": True,
            "canPublish": False,
            "canSubscribe": True,
            "canPublishData": True,
            "canUpdateOwnMetadata": True,
        },
    }
    assert "name" not in decode(issue_room_token(SECRET, room="r", identity="i", now=NOW, ttl_s=60))


def test_issue_stream_token_still_the_same_claims_plus_name():
    plain = decode(issue_stream_token(SECRET, space_id=SPACE, channel_id=CHANNEL, identity="bot", now=NOW))
    assert list(plain) == ["iss", "sub", "nbf", "exp", "video"]
    assert plain["exp"] - plain["nbf"] == STREAM_TOKEN_TTL_S
    named = decode(issue_stream_token(SECRET, space_id=SPACE, channel_id=CHANNEL, identity="bot", name="Bot", now=NOW))
    assert named == {**plain, "name": "Bot"}
    token = issue_stream_token(SECRET, space_id=SPACE, channel_id=CHANNEL, identity="bot", now=NOW)
    assert verify_stream_token(SECRET, token, now=NOW).room == f"{SPACE}/{CHANNEL}"
    assert verify_room_token(SECRET, token, now=NOW).space_id == SPACE


@pytest.mark.parametrize(
    "kwargs",
    [{"room": ""}, {"identity": ""}, {"ttl_s": 0}, {"ttl_s": -5}],
)
def test_issue_room_token_misuse(kwargs):
    args = {**dict(room="r", identity="i", now=NOW, ttl_s=60), **kwargs}
    with pytest.raises(LocalProtocolError):
        issue_room_token(SECRET, **args)
    with pytest.raises(LocalProtocolError):
        issue_room_token("", room="r", identity="i", now=NOW, ttl_s=60)


def test_verify_room_token_round_trip():
    token = issue_room_token(
        SECRET, room=f"{SPACE}/{CHANNEL}", identity=BOT_USER, name="Echo", now=NOW, ttl_s=STREAM_TOKEN_TTL_S,
        can_subscribe=False,
    )
    grant = verify_room_token(SECRET, token, now=NOW + 10, issuer="gateway")
    assert grant == RoomGrant(
        room=f"{SPACE}/{CHANNEL}", identity=BOT_USER, name="Echo", expires_at=1_800_000_000 + 7200,
        can_publish=True, can_subscribe=False,
    )
    assert (grant.space_id, grant.channel_id) == (SPACE, CHANNEL)


@pytest.mark.parametrize("room", ["call-room-1", "a/b/c", "/b", "a/", "a//b"])
def test_room_grant_ids_only_for_space_channel_rooms(room):
    grant = RoomGrant(room=room, identity="i", name="", expires_at=0, can_publish=True, can_subscribe=True)
    assert (grant.space_id, grant.channel_id) == (None, None)


def _b64(data) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(**overrides) -> dict:
    claims = {
        "iss": "gateway",
        "sub": BOT_USER,
        "nbf": int(NOW),
        "exp": int(NOW) + 600,
        "video": {"room": f"{SPACE}/{CHANNEL}", "roomJoin": True},
    }
    for key, value in overrides.items():
        if value is ...:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


def _sign(claims: dict, *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    # signed as raw JWS: PyJWT's jwt.encode refuses some of the ill-typed claims tested here
    return jwt.api_jws.PyJWS().encode(json.dumps(claims).encode(), secret, algorithm=algorithm)


def check_token_refused(token: str, status: int, fragment: str, *, now: float = NOW, issuer: str | None = None) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_room_token(SECRET, token, now=now, issuer=issuer)
    err = info.value
    assert err.status == status, (err.status, str(err))
    assert fragment in str(err), str(err)
    assert isinstance(err, GatewayError)
    for text in (str(err), repr(err)):
        assert SECRET not in text
        if token:
            assert token not in text
    return err


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "a.b",
        "eyJhbGciOiJIUzI1NiJ9..",
        "é.é.é",
        f"{_b64([1, 2])}.{_b64({'sub': 'x'})}.",  # header not an object
        f"{_b64({'alg': 'HS256'})}.{_b64(b'not json')}.c2ln",
        f"{_b64({'alg': 'HS256'})}.{_b64([1])}.c2ln",  # payload not an object
    ],
)
def test_unparseable_token_is_401(token):
    err = check_token_refused(token, 401, "room token")
    assert "empty" in str(err) or "malformed" in str(err)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"exp": "tomorrow"}, "exp claim is not a number"),
        ({"exp": float("nan")}, "exp claim is not a number"),
        ({"nbf": True}, "nbf claim is not a number"),
        ({"iat": "now"}, "iat claim is not a number"),
        ({"sub": 5}, "sub claim is not a string"),
        ({"iss": ["a"]}, "iss claim is not a string"),
    ],
)
def test_registered_claims_of_the_wrong_type_are_401(overrides, fragment):
    check_token_refused(_sign(_claims(**overrides)), 401, fragment)


def test_wrong_issuer_is_403():
    token = _sign(_claims())
    assert verify_room_token(SECRET, token, now=NOW, issuer="gateway").identity == BOT_USER
    assert verify_room_token(SECRET, token, now=NOW).identity == BOT_USER  # issuer not checked
    check_token_refused(token, 403, "issuer", issuer="APIotherkey")
    check_token_refused(_sign(_claims(iss=...)), 403, "issuer", issuer="gateway")
    # the issuer is compared before the signature, as the server does (API key, then Verify)
    check_token_refused(_sign(_claims(iss="x"), secret="another-secret-another-secret-32b"), 403, "issuer", issuer="gateway")


def test_bad_signature_is_403():
    check_token_refused(_sign(_claims(), secret="another-secret-another-secret-32b"), 403, "signature")
    header, payload, signature = _sign(_claims()).split(".")
    tampered = ".".join([header, _b64(_claims(video={"room": f"{SPACE}/other", "roomJoin": True})), signature])
    check_token_refused(tampered, 403, "signature")
    check_token_refused(f"{header}.{payload}.", 403, "signature")


def test_other_algorithms_are_403():
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    check_token_refused(unsigned, 403, "algorithm")
    check_token_refused(_sign(_claims(), secret=SECRET + SECRET, algorithm="HS512"), 403, "algorithm")
    check_token_refused(_sign(_claims(), secret=SECRET + SECRET, algorithm="HS384"), 403, "algorithm")
    no_alg = f"{_b64({'typ': 'JWT'})}.{_b64(_claims())}.c2ln"
    check_token_refused(no_alg, 403, "algorithm")


def test_expiry_with_the_one_minute_leeway():
    token = _sign(_claims(exp=int(NOW) + 10))
    assert verify_room_token(SECRET, token, now=int(NOW) + 10 + 60).identity == BOT_USER  # at the edge
    check_token_refused(token, 403, "expired", now=int(NOW) + 10 + 60.5)
    with pytest.raises(TokenError):
        verify_room_token(SECRET, token, now=int(NOW) + 11, leeway_s=0)
    check_token_refused(_sign(_claims(exp=...)), 403, "no exp")


def test_not_yet_valid_with_the_one_minute_leeway():
    token = _sign(_claims(nbf=int(NOW) + 100))
    assert verify_room_token(SECRET, token, now=int(NOW) + 40).identity == BOT_USER
    check_token_refused(token, 403, "not yet valid", now=int(NOW) + 39.5)
    check_token_refused(_sign(_claims(iat=int(NOW) + 100)), 403, "issued in the future", now=int(NOW))
    assert verify_room_token(SECRET, _sign(_claims(nbf=...)), now=NOW).room == f"{SPACE}/{CHANNEL}"


@pytest.mark.parametrize(
    "video",
    [
        ...,
        None,
        {},
        "room",
        {"roomJoin": True},
        {"room": "", "roomJoin": True},
        {"room": 5, "roomJoin": True},
        {"room": f"{SPACE}/{CHANNEL}"},
        {"room": f"{SPACE}/{CHANNEL}", "roomJoin": False},
        {"room": f"{SPACE}/{CHANNEL}", "roomJoin": "true"},
    ],
)
def test_no_room_grant_is_403(video):
    check_token_refused(_sign(_claims(video=video)), 403, "no room grant")


@pytest.mark.parametrize("sub", [..., ""])
def test_no_identity_is_403(sub):
    check_token_refused(_sign(_claims(sub=sub)), 403, "no identity")


def test_grant_flags():
    room = f"{SPACE}/{CHANNEL}"
    grant = verify_room_token(SECRET, _sign(_claims(video={"room": room, "roomJoin": True})), now=NOW)
    assert (grant.can_publish, grant.can_subscribe, grant.name) == (True, True, "")  # LiveKit's defaults
    video = {"room": room, "roomJoin": True, "canPublish": False, "canSubscribe": True}
    grant = verify_room_token(SECRET, _sign(_claims(video=video)), now=NOW)
    assert (grant.can_publish, grant.can_subscribe) == (False, True)
    check_token_refused(_sign(_claims(video={**video, "canPublish": "no"})), 403, "canPublish")
    check_token_refused(_sign(_claims(name=7)), 403, "name")


def test_verify_room_token_misuse():
    with pytest.raises(LocalProtocolError):
        verify_room_token("", "x", now=NOW)
    with pytest.raises(LocalProtocolError):
        verify_room_token(SECRET, "x", now=NOW, leeway_s=-1)


def test_token_error_status_default():
    assert TokenError("x").status == 403
    with pytest.raises(TokenError) as info:
        verify_stream_token(SECRET, "", now=NOW)  # the seed's verifier is unchanged
    assert "malformed" in str(info.value)


# --- status messages ----------------------------------------------------------------------

STATUS_EXAMPLES = [
    ({"status": "ready", "session_id": "AWS_abc"}, StatusMessage("ready", session_id="AWS_abc")),
    (
        {"status": "waiting", "session_id": "AWS_abc", "participant_identity": CALLER},
        StatusMessage("waiting", session_id="AWS_abc", participant_identity=CALLER),
    ),
    (
        {"status": "subscribed", "session_id": "AWS_abc", "track_sid": "TR_x", "participant_identity": CALLER},
        StatusMessage("subscribed", session_id="AWS_abc", participant_identity=CALLER, track_sid="TR_x"),
    ),
    (
        {"status": "target_left", "session_id": "AWS_abc", "participant_identity": CALLER},
        StatusMessage("target_left", session_id="AWS_abc", participant_identity=CALLER),
    ),
    (
        {"status": "error", "message": "failed to create session: room full"},
        StatusMessage("error", message="failed to create session: room full"),
    ),
    ({"status": "something_new", "extra": [1, 2]}, StatusMessage("something_new")),
]


@pytest.mark.parametrize("obj, expected", STATUS_EXAMPLES)
@pytest.mark.parametrize("key", ["status", "type"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_parse_status_message(obj, expected, key, as_bytes):
    obj = {(key if k == "status" else k): v for k, v in obj.items()}
    text = json.dumps(obj)
    assert parse_status_message(text.encode() if as_bytes else text) == expected


def test_status_wins_over_type_and_nulls_are_none():
    assert parse_status_message('{"type": "ready", "status": "subscribed"}').status == "subscribed"
    assert parse_status_message('{"status": "ready", "session_id": null}') == StatusMessage("ready")
    # what the pre-2026 server sent (lk-ingress readyMessage / errorMessage)
    assert parse_status_message('{"type":"ready","session_id":"AWS_1"}') == StatusMessage("ready", session_id="AWS_1")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "not JSON"),
        ("ready", "not JSON"),
        ('{"status": "ready"', "not JSON"),
        (b'{"status": "\xff"}', "not JSON"),
        ('{"status": NaN}', "not JSON"),
        ("[]", "is an array, not an object"),
        ('"ready"', "is a string, not an object"),
        ("null", "is null, not an object"),
        ("{}", "no status (or type)"),
        ('{"session_id": "AWS_1"}', "no status (or type)"),
        ('{"status": null, "type": "ready"}', "no status"),
        ('{"status": 1}', "status is a number, not a string"),
        ('{"type": true}', "type is a boolean, not a string"),
        ('{"status": ""}', "status is empty"),
        ('{"status": "ready", "session_id": 5}', "session_id is a number, not a string"),
        ('{"status": "subscribed", "track_sid": ["x"]}', "track_sid is an array, not a string"),
        ('{"status": "waiting", "participant_identity": {}}', "participant_identity is an object"),
        ('{"status": "error", "message": false}', "message is a boolean"),
    ],
)
def test_parse_status_message_malformed(text, fragment):
    with pytest.raises(RemoteProtocolError) as info:
        parse_status_message(text)
    assert info.value.close_code == 1007
    assert fragment in str(info.value)


def test_status_message_serializer():
    assert status_message("ready", session_id="AWS_1") == '{"status":"ready","session_id":"AWS_1"}'
    text = status_message("subscribed", session_id="AWS_1", track_sid="TR_1", participant_identity=CALLER)
    assert text == f'{{"status":"subscribed","session_id":"AWS_1","track_sid":"TR_1","participant_identity":"{CALLER}"}}'
    assert status_message("target_left", session_id="AWS_1", participant_identity=None) == (
        '{"status":"target_left","session_id":"AWS_1"}'
    )
    for obj, expected in STATUS_EXAMPLES[:5]:
        fields = {k: v for k, v in obj.items() if k != "status"}
        assert parse_status_message(status_message(obj["status"], **fields)) == expected
    with pytest.raises(LocalProtocolError):
        status_message("")
    with pytest.raises(LocalProtocolError):
        status_message("ready", session_id=5)


# --- REST: calls, self --------------------------------------------------------------------


def test_rest_constants():
    assert (EVENTS_PATH, CALLS_ACCEPT_PATH, CALLS_REJECT_PATH, GET_ME_PATH) == (
        "/IEvents/v1/Stream", "/ICalls/v20260401/Accept", "/ICalls/v20260401/Reject", "/IBotSelf/v1/GetMe",
    )
    assert (INTENT_VOICE, INTENT_CALLS) == (2048, 4096)
    assert (STREAM_TOKEN_RATE_PER_MINUTE_SERVER, STREAM_TOKEN_RATE_PER_MINUTE) == (20, 5)
    assert CALL_TOKEN_TTL_S == 3600


def test_accept_round_trip():
    assert accept_request("call-1") == {"callId": "call-1"}
    body = accept_response(JWT_LIKE, "call-room", CALLER, "wss://audio.argon.zone")
    assert json.loads(body) == {
        "token": JWT_LIKE, "roomName": "call-room", "callerId": CALLER, "audioBaseUrl": "wss://audio.argon.zone",
    }
    grant = parse_accept_response(200, body, call_id="call-1")
    assert grant == CallGrant(
        token=JWT_LIKE, room_name="call-room", caller_id=CALLER, audio_base_url="wss://audio.argon.zone"
    )
    assert_no_secret(grant)
    url = build_audio_url(
        grant.audio_base_url, AudioPath.DUPLEX, token=grant.token, target_identity=grant.caller_id,
        target_track_source="microphone",
    )
    req = parse_audio_request(url, None)
    assert (req.path, req.token, req.target_identity) == (AudioPath.DUPLEX, JWT_LIKE, CALLER)
    with pytest.raises(LocalProtocolError):
        accept_request("")


def calls_error(status: int, body: bytes = b"", *, reject: bool = False, **kwargs) -> CallsError:
    parse = parse_reject_response if reject else parse_accept_response
    with pytest.raises(CallsError) as info:
        parse(status, body, call_id="call-42", **kwargs)
    err = info.value
    assert isinstance(err, ServiceError)
    assert err.status == status
    assert "call-42" in str(err)
    assert ("Reject" if reject else "Accept") in str(err)
    assert_no_secret(err)
    return err


CALL_ERRORS = [
    (400, "bad request", True),
    (401, "bot token rejected", True),
    (403, "not allowed", True),
    (404, "no such call", True),
    (409, "call already answered", True),
    (429, "rate limited", False),
    (408, "timed out", False),
    (418, "request refused", True),
    (500, "service error", False),
    (502, "service error", False),
    (503, "service error", False),
    (302, "unexpected response", False),
]


@pytest.mark.parametrize("status, cause, permanent", CALL_ERRORS)
@pytest.mark.parametrize("reject", [False, True])
def test_calls_error_statuses(status, cause, permanent, reject):
    # an error body that echoes secrets must never leak into the message
    body = json.dumps({"error": f"bad Authorization: Bot {BOT_TOKEN}", "token": JWT_LIKE, "message": JWT_LIKE}).encode()
    err = calls_error(status, body, reject=reject)
    assert cause in str(err)
    assert f"HTTP {status}" in str(err)
    assert err.permanent is permanent
    assert err.retry_after is None
    assert calls_error(status, reject=reject).permanent is permanent


def test_calls_error_quotes_the_servers_cause():
    err = calls_error(403, api_error_body("not_verified", "This endpoint requires a verified bot."))
    assert str(err) == (
        "Argon Calls Accept (call call-42): not allowed (bot not verified, or not the callee) (HTTP 403): "
        "not_verified: This endpoint requires a verified bot."
    )
    err = calls_error(400, api_error_body("not_ringing", "Call is not in ringing state."))
    assert str(err).endswith("(HTTP 400): not_ringing: Call is not in ringing state.")
    err = calls_error(404, error_body(404, f"call {CALLER} not found"))  # RFC 9457: detail
    assert str(err).endswith(f"(HTTP 404): call {CALLER} not found")  # GUIDs are kept
    err = calls_error(409, b'{"title": "Conflict"}')
    assert str(err).endswith("(HTTP 409): Conflict")
    err = calls_error(400, json.dumps({"error": "bad", "message": f"token={JWT_LIKE} rejected"}).encode())
    assert "rejected" in str(err) and "…" in str(err)
    err = calls_error(400, json.dumps({"error": "x" * 500}).encode())
    assert len(str(err)) < 300
    assert calls_error(500, b"<html>Bad gateway</html>").args[0].endswith("(HTTP 500)")


def test_calls_rate_limit_retry_after():
    assert calls_error(429, retry_after_s=12.5).retry_after == 12.5
    assert calls_error(429, b'{"retryAfter": 30}').retry_after == 30
    assert calls_error(429, b'{"retryAfter": 30}', retry_after_s=5).retry_after == 5  # header wins
    assert calls_error(429, b"not json").retry_after is None
    assert "retry after 12.5 s" in str(calls_error(429, retry_after_s=12.5))
    assert calls_error(429, error_body(429, "slow down", retry_after_s=20), reject=True).retry_after == 20


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "not a JSON object"),
        (b"[1]", "not a JSON object"),
        (b"\xff", "not a JSON object"),
        ({"roomName": "r", "callerId": CALLER, "audioBaseUrl": "wss://a"}, "no token field"),
        ({"token": JWT_LIKE, "callerId": CALLER, "audioBaseUrl": "wss://a"}, "no roomName field"),
        ({"token": JWT_LIKE, "roomName": "r", "audioBaseUrl": "wss://a"}, "no callerId field"),
        ({"token": JWT_LIKE, "roomName": "r", "callerId": 5, "audioBaseUrl": "wss://a"}, "no callerId field"),
        ({"token": JWT_LIKE, "roomName": "r", "callerId": CALLER}, "no audioBaseUrl field"),
        ({"token": JWT_LIKE, "roomName": "r", "callerId": CALLER, "audioBaseUrl": "ftp://a"}, "audioBaseUrl is not"),
        ({"token": JWT_LIKE, "roomName": "r", "callerId": CALLER, "audioBaseUrl": "audio"}, "audioBaseUrl is not"),
    ],
)
def test_accept_response_missing_field(body, fragment):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    err = calls_error(200, raw)
    assert fragment in str(err)
    assert err.permanent is False


def test_reject():
    assert reject_request("call-1") == {"callId": "call-1"}
    assert reject_request("call-1", "busy") == {"callId": "call-1", "reason": "busy"}
    assert reject_request("call-1", "") == {"callId": "call-1"}
    with pytest.raises(LocalProtocolError):
        reject_request("")
    for body in (b"", b'{"rejected": true}', b"{}", b"ok"):
        assert parse_reject_response(200, body, call_id="call-1") is None
    assert parse_reject_response(204, b"", call_id="call-1") is None
    err = calls_error(200, b'{"rejected": false}', reject=True)
    assert "not rejected" in str(err) and err.permanent


def test_get_me():
    bot = BotSelf(bot_id="b-1", user_id=BOT_USER, username="echo_bot", display_name="Echo")
    body = get_me_response(bot)
    assert json.loads(body) == {"botId": "b-1", "userId": BOT_USER, "username": "echo_bot", "displayName": "Echo"}
    assert parse_get_me_response(200, body) == bot
    assert parse_get_me_response(200, json.dumps({"userId": BOT_USER, "username": 5}).encode()) == BotSelf(
        bot_id="", user_id=BOT_USER, username="", display_name=""
    )


def get_me_error(status: int, body: bytes = b"", **kwargs) -> BotSelfError:
    with pytest.raises(BotSelfError) as info:
        parse_get_me_response(status, body, **kwargs)
    err = info.value
    assert isinstance(err, ServiceError) and err.status == status
    assert "GetMe" in str(err)
    assert_no_secret(err)
    return err


@pytest.mark.parametrize(
    "status, cause, permanent",
    [(401, "bot token rejected", True), (403, "request refused", True), (429, "rate limited", False),
     (500, "service error", False), (503, "service error", False)],
)
def test_get_me_errors(status, cause, permanent):
    body = json.dumps({"error": "unauthorized", "message": f"Bot {BOT_TOKEN} is not valid"}).encode()
    err = get_me_error(status, body)
    assert cause in str(err) and f"HTTP {status}" in str(err)
    assert err.permanent is permanent
    assert "unauthorized" in str(err)


def test_get_me_bad_success_bodies():
    for body in (b"", b"[]", b'{"botId": "b"}', b'{"userId": ""}', b'{"userId": 7}'):
        err = get_me_error(200, body)
        assert err.permanent is False
        assert "userId" in str(err) or "not a JSON object" in str(err)
    assert get_me_error(429, retry_after_s=3).retry_after == 3


def test_api_error_body_shape():
    assert json.loads(api_error_body("not_callee", "This call is not directed at this bot.")) == {
        "error": "not_callee", "message": "This call is not directed at this bot.",
    }
    with pytest.raises(LocalProtocolError):
        api_error_body("", "x")


# --- secrets never shown ------------------------------------------------------------------


def test_no_secret_in_any_object_or_error():
    token = issue_room_token(SECRET, room="r", identity="i", now=NOW, ttl_s=60)
    objects: list[object] = [
        parse_audio_request(f"/audio/connect?token={token}", None),
        parse_audio_request("/audio/duplex?target_identity=x", f"Bearer {token}"),
        parse_accept_response(200, accept_response(token, "r", CALLER, "wss://a"), call_id="c"),
        verify_room_token(SECRET, token, now=NOW),
    ]
    errors: list[BaseException] = []
    attempts = [
        lambda: parse_audio_request(f"/audio/subscribe?token={token}", None),
        lambda: parse_audio_request(f"/nope?token={token}", None),
        lambda: parse_audio_request(f"/audio/connect?token={token}&x=%zz", None),
        lambda: build_audio_url("ftp://x", AudioPath.CONNECT, token=token),
        lambda: build_audio_url(f"ws://x?token={token}", AudioPath.SUBSCRIBE, token=token),
        lambda: verify_room_token(SECRET, token, now=NOW + 10_000),
        lambda: verify_room_token(SECRET, token + "x", now=NOW),
        lambda: verify_room_token(SECRET, token, now=NOW, issuer="other"),
        lambda: verify_room_token(SECRET, token[:-3], now=NOW),
        lambda: parse_accept_response(500, json.dumps({"error": token}).encode(), call_id="c"),
        lambda: parse_accept_response(200, json.dumps({"token": token}).encode(), call_id="c"),
        lambda: parse_get_me_response(401, json.dumps({"detail": f"Bot {BOT_TOKEN}"}).encode()),
    ]
    for attempt in attempts:
        with pytest.raises(GatewayError) as info:
            attempt()
        errors.append(info.value)
    for obj in objects + errors:
        for text in (str(obj), repr(obj), *map(str, getattr(obj, "args", ()))):
            for secret in (token, SECRET, BOT_TOKEN):
                assert secret not in text, (type(obj).__name__, text)
