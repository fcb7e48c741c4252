"""Argon bot voice ingress wire layer (gateway/adapters/argon/wire.py), no event loop needed."""

from __future__ import annotations

import base64
import json
import random
import urllib.parse

import jwt
import numpy as np
import opuslib
import pytest

from gateway.adapters.argon.wire import (
    STREAM_TOKEN_PATH,
    IngressParams,
    OpusMode,
    StreamGrant,
    StreamTokenError,
    StreamTokenGrant,
    TokenError,
    build_ingress_url,
    error_body,
    issue_stream_token,
    parse_ingress_target,
    parse_retry_after,
    parse_stream_token_response,
    stream_token_request,
    stream_token_response,
    validate_opus_packet,
    verify_stream_token,
)
from gateway.errors import GatewayError, LocalProtocolError, RemoteProtocolError, ServiceError

# --- Opus packets -----------------------------------------------------------------------

# RFC 6716 §3.1 Table 2, written out per config: (mode, bandwidth, frame ms).
TABLE_2 = (
    [("silk", "NB", ms) for ms in (10, 20, 40, 60)]
    + [("silk", "MB", ms) for ms in (10, 20, 40, 60)]
    + [("silk", "WB", ms) for ms in (10, 20, 40, 60)]
    + [("hybrid", "SWB", 10), ("hybrid", "SWB", 20), ("hybrid", "FB", 10), ("hybrid", "FB", 20)]
    + [("celt", "NB", ms) for ms in (2.5, 5, 10, 20)]
    + [("celt", "WB", ms) for ms in (2.5, 5, 10, 20)]
    + [("celt", "SWB", ms) for ms in (2.5, 5, 10, 20)]
    + [("celt", "FB", ms) for ms in (2.5, 5, 10, 20)]
)
SILK_NB_20 = 1  # config numbers used below
SILK_NB_60 = 3
CELT_FB_2_5 = 28
CELT_FB_20 = 31


def toc(config: int, *, stereo: bool = False, code: int = 0) -> int:
    return (config << 3) | (int(stereo) << 2) | code


def expect_opus_error(packet: bytes, *fragments: str, **kwargs) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        validate_opus_packet(packet, **kwargs)
    err = info.value
    assert err.close_code == 1007
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    assert len(str(err).encode()) <= 123
    return err


def test_table_2_has_32_configs():
    assert len(TABLE_2) == 32


@pytest.mark.parametrize("config", range(32))
@pytest.mark.parametrize("stereo", [False, True])
def test_toc_every_config(config, stereo):
    mode, bandwidth, frame_ms = TABLE_2[config]
    info = validate_opus_packet(bytes([toc(config, stereo=stereo)]) + b"\xaa\xbb")
    assert info.config == config
    assert info.mode is OpusMode(mode)
    assert info.bandwidth == bandwidth
    assert info.frame_ms == frame_ms
    assert (info.frames, info.duration_ms, info.code) == (1, frame_ms, 0)
    assert info.stereo is stereo
    assert info.frame_sizes == (2,)


@pytest.mark.parametrize("size", [0, 1, 2])
def test_argon_rejects_packets_of_two_bytes_or_less(size):
    packet = bytes([toc(CELT_FB_20)]) * size
    err = expect_opus_error(packet, "too short")
    assert str(err) == f"Opus packet {size} byte{'' if size == 1 else 's'}: too short"


def test_code0():
    info = validate_opus_packet(bytes([toc(CELT_FB_20)]) + b"\x01" * 1275)
    assert (info.frames, info.frame_sizes, info.duration_ms) == (1, (1275,), 20)
    expect_opus_error(bytes([toc(CELT_FB_20)]) + b"\x01" * 1276, "1276 bytes", "1275")


def test_code1():
    info = validate_opus_packet(bytes([toc(CELT_FB_20, code=1)]) + b"\x01" * 10)
    assert (info.code, info.frames, info.frame_sizes, info.duration_ms) == (1, 2, (5, 5), 40)
    expect_opus_error(bytes([toc(CELT_FB_20, code=1)]) + b"\x01" * 9, "code 1", "odd")
    expect_opus_error(bytes([toc(CELT_FB_20, code=1)]) + b"\x01" * 2552, "1276 bytes")


def test_code2_one_byte_length():
    packet = bytes([toc(SILK_NB_20, code=2), 3]) + b"\x01" * 3 + b"\x02" * 7
    info = validate_opus_packet(packet)
    assert (info.code, info.frames, info.frame_sizes, info.duration_ms) == (2, 2, (3, 7), 40)


def test_code2_two_byte_length():
    # 300 = 4 * 12 + 252: first byte 252, second byte 12 (RFC 6716 §3.2.1)
    packet = bytes([toc(SILK_NB_20, code=2), 252, 12]) + b"\x01" * 300 + b"\x02" * 5
    assert validate_opus_packet(packet).frame_sizes == (300, 5)
    # 255 + 4 * 255 = 1275, the largest codable length
    packet = bytes([toc(SILK_NB_20, code=2), 255, 255]) + b"\x01" * 1275
    assert validate_opus_packet(packet).frame_sizes == (1275, 0)


def test_code2_zero_length_frames_are_valid():
    assert validate_opus_packet(bytes([toc(SILK_NB_20, code=2), 0, 9])).frame_sizes == (0, 1)


def test_code2_malformed():
    expect_opus_error(bytes([toc(SILK_NB_20, code=2), 10]) + b"\x01" * 9, "code 2", "10 bytes", "only 9")
    expect_opus_error(bytes([toc(SILK_NB_20, code=2), 252, 12]) + b"\x01" * 299, "code 2", "300 bytes")
    expect_opus_error(bytes([toc(SILK_NB_20, code=2), 0]) + b"\x01" * 1276, "1276 bytes")  # R2 on frame 2


def test_code3_cbr():
    packet = bytes([toc(CELT_FB_20, code=3), 3]) + b"\x01" * 30
    info = validate_opus_packet(packet)
    assert (info.code, info.frames, info.frame_sizes, info.duration_ms, info.padding) == (3, 3, (10, 10, 10), 60, 0)


def test_code3_cbr_with_padding():
    # padding flag, padding length 255 then 10: 254 + 10 = 264 padding bytes (RFC 6716 §3.2.5)
    packet = bytes([toc(CELT_FB_20, code=3), 0x40 | 2, 255, 10]) + b"\x01" * 8 + b"\x00" * 264
    info = validate_opus_packet(packet)
    assert (info.frames, info.frame_sizes, info.padding) == (2, (4, 4), 264)
    packet = bytes([toc(CELT_FB_20, code=3), 0x40 | 1, 3]) + b"\x01" * 5 + b"\x00" * 3
    assert validate_opus_packet(packet).frame_sizes == (5,)


def test_code3_vbr():
    # VBR, 3 frames: lengths 2 and 300 (252, 12) coded, the last takes the rest (4)
    packet = bytes([toc(CELT_FB_20, code=3), 0x80 | 3, 2, 252, 12]) + b"\x01" * (2 + 300 + 4)
    info = validate_opus_packet(packet)
    assert (info.frames, info.frame_sizes, info.duration_ms) == (3, (2, 300, 4), 60)


def test_code3_vbr_with_padding():
    packet = bytes([toc(CELT_FB_20, code=3), 0xC0 | 2, 2, 5]) + b"\x01" * 5 + b"\x00" * 2
    info = validate_opus_packet(packet)
    assert (info.frame_sizes, info.padding) == ((5, 0), 2)


def test_code3_duration_limit():
    info = validate_opus_packet(bytes([toc(CELT_FB_2_5, code=3), 48]) + b"\x01" * 48)
    assert (info.frames, info.duration_ms) == (48, 120)  # exactly 120 ms is allowed (R5)
    expect_opus_error(bytes([toc(CELT_FB_2_5, code=3), 49]) + b"\x01" * 49, "49 x 2.5 ms", "120 ms")
    expect_opus_error(bytes([toc(SILK_NB_60, code=3), 3]) + b"\x01" * 3, "3 x 60 ms")


@pytest.mark.parametrize(
    "packet, fragments",
    [
        (bytes([toc(CELT_FB_20, code=3), 0, 1]), ("code 3 frame count 0",)),
        (bytes([toc(CELT_FB_20, code=3), 0x80, 1]), ("code 3 frame count 0",)),
        (bytes([toc(CELT_FB_20, code=3), 3]) + b"\x01" * 31, ("CBR", "31 bytes", "3 frames")),
        (bytes([toc(CELT_FB_20, code=3), 0x40 | 1, 9]) + b"\x01" * 5, ("padding 9 bytes", "only 5")),
        (bytes([toc(CELT_FB_20, code=3), 0x40 | 1, 255, 255]), ("padding length",)),
        (bytes([toc(CELT_FB_20, code=3), 0x40 | 1, 255]), ("padding length",)),
        (bytes([toc(CELT_FB_20, code=3), 0x80 | 3, 2]), ("no length for code 3 frame 2 of 3",)),
        (bytes([toc(CELT_FB_20, code=3), 0x80 | 2, 252]), ("second byte",)),
        (bytes([toc(CELT_FB_20, code=3), 0x80 | 2, 10]) + b"\x01" * 9, ("VBR", "10 bytes", "only 9")),
        # the frame length may not read into the padding
        (bytes([toc(CELT_FB_20, code=3), 0xC0 | 2, 1, 252]), ("no length for code 3 frame 1 of 2",)),
        (bytes([toc(CELT_FB_20, code=3), 1]) + b"\x01" * 1276, ("1276 bytes", "1275")),
        (bytes([toc(CELT_FB_20, code=3), 0x80 | 2, 0]) + b"\x01" * 1276, ("1276 bytes", "1275")),
    ],
)
def test_code3_malformed(packet, fragments):
    expect_opus_error(packet, *fragments)


def test_stereo_and_duration_mismatch():
    stereo_20 = bytes([toc(CELT_FB_20, stereo=True)]) + b"\x01" * 10
    mono_40 = bytes([toc(CELT_FB_20, code=1)]) + b"\x01" * 10
    expect_opus_error(stereo_20, "TOC says stereo, stream is mono", channels=1)
    expect_opus_error(mono_40, "TOC says mono, stream is stereo", channels=2)
    err = expect_opus_error(mono_40, frame_duration_ms=20, channels=1)
    assert str(err) == "packet is 40 ms, stream is 20 ms"
    assert validate_opus_packet(stereo_20, channels=2, frame_duration_ms=20).stereo
    assert validate_opus_packet(mono_40, channels=1, frame_duration_ms=40).duration_ms == 40
    expect_opus_error(bytes([toc(CELT_FB_2_5)]) + b"\x01" * 5, "packet is 2.5 ms, stream is 10 ms", frame_duration_ms=10)


def test_channels_argument_is_checked():
    with pytest.raises(LocalProtocolError):
        validate_opus_packet(bytes([toc(CELT_FB_20)]) + b"\x01" * 10, channels=3)


def _tone(samples: int, channels: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 48000
    left = 6000 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 800, samples)
    right = 6000 * np.sin(2 * np.pi * 660 * t) + rng.normal(0, 800, samples)
    pcm = np.stack([left, right][:channels], axis=1)
    return np.clip(pcm, -32768, 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("frame_ms", [10, 20, 40, 60])
def test_real_opuslib_packets(channels, frame_ms):
    encoder = opuslib.Encoder(48000, channels, opuslib.APPLICATION_AUDIO)
    samples = 48 * frame_ms
    codes = set()
    for i in range(5):
        packet = encoder.encode(_tone(samples, channels, i), samples)
        info = validate_opus_packet(packet, channels=channels, frame_duration_ms=frame_ms)
        assert info.duration_ms == frame_ms
        assert info.stereo is (channels == 2)
        assert sum(info.frame_sizes) + info.padding < len(packet)
        codes.add(info.code)
        other = 2 if channels == 1 else 1
        expect_opus_error(packet, "TOC says", channels=other)
        expect_opus_error(packet, f"packet is {frame_ms} ms", frame_duration_ms=80 - frame_ms if frame_ms != 40 else 20)
    if frame_ms == 60:
        assert codes == {3}  # libopus packs 3 x 20 ms CELT frames with code 3


@pytest.mark.parametrize("frame_ms", [2.5, 5])
def test_real_opuslib_short_frames(frame_ms):
    encoder = opuslib.Encoder(48000, 1, opuslib.APPLICATION_AUDIO)
    samples = int(48 * frame_ms)
    info = validate_opus_packet(encoder.encode(_tone(samples, 1, 0), samples), frame_duration_ms=frame_ms)
    assert info.duration_ms == frame_ms and info.mode is OpusMode.CELT


def test_opus_fuzz_never_raises_anything_but_remote_protocol_error():
    rng = random.Random(6716)
    outcomes = set()
    for _ in range(20000):
        size = rng.choice([rng.randrange(0, 8), rng.randrange(0, 64), rng.randrange(0, 2000)])
        packet = bytes(rng.randrange(256) for _ in range(size)) if size < 64 else rng.randbytes(size)
        try:
            info = validate_opus_packet(packet, channels=rng.choice([None, 1, 2]))
        except RemoteProtocolError as err:
            assert err.close_code == 1007
            outcomes.add("error")
        else:
            # what was reported accounts for every byte: TOC + framing overhead + frames + padding
            assert sum(info.frame_sizes) + info.padding < len(packet)
            assert info.duration_ms <= 120
            outcomes.add("ok")
    assert outcomes == {"ok", "error"}


# --- ingress URL ------------------------------------------------------------------------

JWT_LIKE = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXNlY3JldA"


def test_build_ingress_url_matches_spec_example():
    params = IngressParams(token="TOKEN", stereo=True, frame_duration_ms=20, track_name="music", track_source="microphone")
    assert build_ingress_url("ws://ingress.argon.gl:12880", "", params) == (
        "ws://ingress.argon.gl:12880?token=TOKEN&stereo=true&frame_duration_ms=20"
        "&track_name=music&track_source=microphone&metadata="
    )


def test_build_ingress_url_percent_encodes_values():
    params = IngressParams(token="a.b-c_d", track_name="my music & more", metadata="k=v+1/2")
    url = build_ingress_url("ws://i.example", "", params)
    # %20 rather than "+" for spaces: decoders that do not treat "+" as a space still agree
    assert url.endswith("&track_name=my%20music%20%26%20more&track_source=&metadata=k%3Dv%2B1%2F2")
    assert "token=a.b-c_d&" in url  # JWT characters are unreserved: sent as they are


@pytest.mark.parametrize("base", ["ws://ingress.argon.gl:12880", "ws://ingress.argon.gl:12880/"])
@pytest.mark.parametrize("path", ["/ingress", "ingress"])
def test_build_ingress_url_joins_path_with_one_slash(base, path):
    url = build_ingress_url(base, path, IngressParams(token="t"))
    assert url.startswith("ws://ingress.argon.gl:12880/ingress?token=t&stereo=false&frame_duration_ms=20&")


def test_build_ingress_url_keeps_base_path_and_query_and_maps_https():
    url = build_ingress_url("https://edge.example/voice/?region=eu", "/ws", IngressParams(token="t"))
    assert url.startswith("wss://edge.example/voice/ws?region=eu&token=t&")
    with pytest.raises(LocalProtocolError):
        build_ingress_url("ftp://x", "", IngressParams(token="t"))


AWKWARD = [
    ("music & friends", "screen_share_audio", '{"a": "b&c=d", "n": 1}'),
    ("100% radio + talk", "microphone", "x=y; z?"),
    ("Ünïcødé ☃ #1", "мікрофон", "日本語 / emoji 🎵"),
    ("", "", ""),
]


@pytest.mark.parametrize("track_name, track_source, metadata", AWKWARD)
@pytest.mark.parametrize("stereo, frame_ms", [(False, 10), (True, 20), (True, 40), (False, 60)])
def test_ingress_url_round_trip(track_name, track_source, metadata, stereo, frame_ms):
    params = IngressParams(
        token=JWT_LIKE, stereo=stereo, frame_duration_ms=frame_ms,
        track_name=track_name, track_source=track_source, metadata=metadata,
    )
    url = build_ingress_url("wss://ingress.argon.gl:12880/", "/v1/ingress", params)
    parts = urllib.parse.urlsplit(url)
    assert " " not in url and url.isascii()
    assert parts.query.count("&") == 5  # values never add separators
    target = f"{parts.path}?{parts.query}"
    path, parsed = parse_ingress_target(target)
    assert path == "/v1/ingress"
    assert parsed == params
    assert parse_ingress_target(url) == (path, params)  # a full URL works too


def test_parse_ingress_target_defaults():
    path, params = parse_ingress_target(f"/?token={JWT_LIKE}")
    assert path == "/"
    assert params == IngressParams(token=JWT_LIKE, stereo=False, frame_duration_ms=20)
    assert (params.track_name, params.track_source, params.metadata, params.channels) == ("", "", "", 1)


@pytest.mark.parametrize(
    "query, stereo",
    [
        ("stereo=true", True), ("stereo=TRUE", True), ("stereo=1", True), ("stereo=false", False),
        ("channels=2", True), ("channels=1", False), ("stereo=true&channels=2", True),
        ("stereo=false&channels=1", False), ("plus=ignored", False),
    ],
)
def test_parse_ingress_target_channels(query, stereo):
    _, params = parse_ingress_target(f"/in?token=t&{query}")
    assert params.stereo is stereo
    assert params.channels == (2 if stereo else 1)


def _query_error(query: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        parse_ingress_target(f"/in?{query}")
    err = info.value
    assert JWT_LIKE not in str(err) and JWT_LIKE not in repr(err)
    return err


@pytest.mark.parametrize("query", ["", "stereo=true", "token=", "token=&stereo=false"])
def test_parse_ingress_target_missing_token_is_policy_violation(query):
    err = _query_error(query)
    assert err.close_code == 1008 and "token" in str(err)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ("stereo=maybe", "stereo"),
        ("channels=3", "channels"),
        ("channels=two", "channels"),
        ("stereo=true&channels=1", "stereo and channels disagree"),
        ("stereo=false&channels=2", "stereo and channels disagree"),
        ("frame_duration_ms=30", "frame_duration_ms"),
        ("frame_duration_ms=20.0", "frame_duration_ms"),
        ("frame_duration_ms=", "frame_duration_ms"),
        (f"token={JWT_LIKE}x", "token given twice"),
        ("track_name=%FF", "UTF-8"),
    ],
)
def test_parse_ingress_target_bad_values(extra, fragment):
    err = _query_error(f"token={JWT_LIKE}&{extra}")
    assert err.close_code == 1002
    assert fragment in str(err)


def test_ingress_params_repr_hides_token_and_validates():
    params = IngressParams(token=JWT_LIKE, track_name="music")
    assert JWT_LIKE not in repr(params) and "music" in repr(params)
    for bad in (30, 0, 20.5, True):
        with pytest.raises(LocalProtocolError, match="frame_duration_ms"):
            IngressParams(token="t", frame_duration_ms=bad)


# --- stream JWT -------------------------------------------------------------------------

SECRET = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t!"  # >= 32 bytes (RFC 7518 §3.2)
SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
NOW = 1_800_000_000.25


def _token(**kwargs) -> str:
    args = dict(space_id=SPACE, channel_id=CHANNEL, identity="music_bot", now=NOW)
    args.update(kwargs)
    return issue_stream_token(SECRET, **args)


def test_issue_stream_token_claims():
    token = _token()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
    assert claims["sub"] == "music_bot"
    assert claims["iss"] == "gateway"
    assert claims["nbf"] == 1_800_000_000
    assert claims["exp"] - claims["nbf"] == 7200  # spec: 2 hours
    assert claims["video"] == {
        "room": f"{SPACE}/{CHANNEL}",
        "roomJoin": True,
        "canPublish": True,
        "canSubscribe": True,
        "canPublishData": True,
        "canUpdateOwnMetadata": True,
    }


def test_verify_stream_token_round_trip():
    grant = verify_stream_token(SECRET, _token(), now=NOW + 60)
    assert grant == StreamGrant(
        room=f"{SPACE}/{CHANNEL}", space_id=SPACE, channel_id=CHANNEL, identity="music_bot",
        expires_at=1_800_000_000 + 7200,
    )


def _token_error(token: str, *, now: float = NOW + 1, secret: str = SECRET) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_stream_token(secret, token, now=now)
    err = info.value
    assert isinstance(err, GatewayError)
    for secret_text in (token, SECRET):
        if secret_text:
            assert secret_text not in str(err) and secret_text not in repr(err)
    return err


def test_verify_expired():
    token = _token(ttl_s=60)
    assert verify_stream_token(SECRET, token, now=1_800_000_059.9).identity == "music_bot"
    assert "expired" in str(_token_error(token, now=1_800_000_060))
    assert "expired" in str(_token_error(_token(), now=NOW + 7200))


def test_verify_not_yet_valid():
    assert "not yet valid" in str(_token_error(_token(), now=NOW - 10))


def test_verify_wrong_secret():
    assert "signature" in str(_token_error(_token(), secret="another-secret-another-secret-32b"))


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_verify_tampered():
    header, payload, signature = _token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["video"]["room"] = f"{SPACE}/another-channel"
    tampered = ".".join([header, _b64(claims), signature])
    assert "signature" in str(_token_error(tampered))


@pytest.mark.parametrize(
    "video",
    [None, {}, {"roomJoin": True}, {"room": "", "roomJoin": True}, {"room": f"{SPACE}/{CHANNEL}"},
     {"room": f"{SPACE}/{CHANNEL}", "roomJoin": False}, "room"],
)
def test_verify_missing_room_grant(video):
    claims = {"sub": "bot", "nbf": int(NOW), "exp": int(NOW) + 60}
    if video is not None:
        claims["video"] = video
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert "no room grant" in str(_token_error(token))


def test_verify_room_format_and_publish_grant():
    base = {"sub": "bot", "exp": int(NOW) + 60}
    token = jwt.encode({**base, "video": {"room": "lobby", "roomJoin": True, "canPublish": True}}, SECRET)
    assert "{spaceId}/{channelId}" in str(_token_error(token))
    token = jwt.encode({**base, "video": {"room": f"{SPACE}/{CHANNEL}", "roomJoin": True}}, SECRET)
    assert "publish" in str(_token_error(token))


@pytest.mark.parametrize(
    "claims, fragment",
    [
        ({"sub": "bot"}, "no exp"),
        ({"sub": "bot", "exp": "tomorrow"}, "exp claim is not a number"),
        ({"sub": "bot", "exp": float("nan")}, "exp claim is not a number"),
        ({"exp": int(NOW) + 60}, "sub"),
    ],
)
def test_verify_malformed_claims(claims, fragment):
    claims = {**claims, "video": {"room": f"{SPACE}/{CHANNEL}", "roomJoin": True, "canPublish": True}}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert fragment in str(_token_error(token))


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..", "é.é.é", JWT_LIKE])
def test_verify_malformed_tokens(token):
    err = _token_error(token)
    assert "malformed" in str(err) or "signature" in str(err)


def test_verify_refuses_other_algorithms():
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': 'bot', 'exp': int(NOW) + 60})}."
    assert "algorithm" in str(_token_error(unsigned))
    hs512 = jwt.encode({"sub": "bot", "exp": int(NOW) + 60}, SECRET + SECRET, algorithm="HS512")
    assert "algorithm" in str(_token_error(hs512, secret=SECRET + SECRET))


def test_issue_stream_token_validates_arguments():
    for kwargs in ({"identity": ""}, {"space_id": ""}, {"channel_id": "a/b"}, {"ttl_s": 0}):
        with pytest.raises(LocalProtocolError):
            _token(**kwargs)
    with pytest.raises(LocalProtocolError):
        issue_stream_token("", space_id=SPACE, channel_id=CHANNEL, identity="bot", now=NOW)


# --- StreamToken REST -------------------------------------------------------------------

BOT_TOKEN = "MTIzNDU2Nzg5.bot-secret-token-value"


def test_stream_token_request_shape():
    assert STREAM_TOKEN_PATH == "/IVoice/v1/StreamToken"
    assert stream_token_request(SPACE, CHANNEL) == {"spaceId": SPACE, "channelId": CHANNEL}
    with pytest.raises(LocalProtocolError):
        stream_token_request("", CHANNEL)


def test_stream_token_response_round_trip():
    body = stream_token_response(JWT_LIKE, "ws://ingress.argon.gl:12880", f"{SPACE}/{CHANNEL}")
    assert json.loads(body) == {"token": JWT_LIKE, "ingressUrl": "ws://ingress.argon.gl:12880", "roomName": f"{SPACE}/{CHANNEL}"}
    grant = parse_stream_token_response(200, body, space_id=SPACE, channel_id=CHANNEL)
    assert grant == StreamTokenGrant(token=JWT_LIKE, ingress_url="ws://ingress.argon.gl:12880", room_name=f"{SPACE}/{CHANNEL}")
    assert JWT_LIKE not in repr(grant)


def test_stream_token_response_room_name_defaults():
    body = json.dumps({"token": JWT_LIKE, "ingressUrl": "wss://i.example"}).encode()
    assert parse_stream_token_response(200, body, space_id=SPACE, channel_id=CHANNEL).room_name == f"{SPACE}/{CHANNEL}"


def _service_error(status: int, body: bytes = b"", **kwargs) -> StreamTokenError:
    with pytest.raises(StreamTokenError) as info:
        parse_stream_token_response(status, body, space_id=SPACE, channel_id=CHANNEL, **kwargs)
    err = info.value
    assert isinstance(err, ServiceError)
    assert err.status == status
    assert SPACE in str(err) and CHANNEL in str(err)
    for secret in (BOT_TOKEN, JWT_LIKE):
        assert secret not in str(err) and secret not in repr(err)
    return err


@pytest.mark.parametrize(
    "status, cause, permanent",
    [
        (400, "channel is not a voice channel", True),
        (401, "bot token rejected", True),
        (403, "bot is not a member of the space", True),
        (404, "no such channel", True),
        (429, "rate limited", False),
        (408, "timed out", False),
        (418, "request refused", True),
        (500, "service error", False),
        (502, "service error", False),
        (503, "service error", False),
        (302, "unexpected response", False),
    ],
)
def test_stream_token_error_statuses(status, cause, permanent):
    # an error body that echoes secrets must never leak into the message
    body = json.dumps({"error": f"bad Authorization: Bot {BOT_TOKEN}", "token": JWT_LIKE}).encode()
    err = _service_error(status, body)
    assert cause in str(err)
    assert f"HTTP {status}" in str(err)
    assert err.permanent is permanent
    assert err.retry_after is None


def test_stream_token_rate_limit_retry_after():
    assert _service_error(429, retry_after_s=12.5).retry_after == 12.5
    assert _service_error(429, b'{"retryAfter": 30}').retry_after == 30
    assert _service_error(429, b'{"retryAfter": 30}', retry_after_s=5).retry_after == 5  # header wins
    assert _service_error(429, b"not json").retry_after is None
    assert "retry after 12.5 s" in str(_service_error(429, retry_after_s=12.5))
    assert _service_error(429, error_body(429, "slow down", retry_after_s=20)).retry_after == 20


def test_parse_retry_after_header():
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 7 ") == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None  # needs a clock
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    "body, field",
    [
        ({"ingressUrl": "ws://i.example", "roomName": "r"}, "token"),
        ({"token": "", "ingressUrl": "ws://i.example"}, "token"),
        ({"token": JWT_LIKE, "roomName": "r"}, "ingressUrl"),
        ({"token": JWT_LIKE, "ingressUrl": 5}, "ingressUrl"),
        ({"token": JWT_LIKE, "ingressUrl": "mailto:x@y"}, "ingressUrl"),
    ],
)
def test_stream_token_response_missing_field(body, field):
    err = _service_error(200, json.dumps(body).encode())
    assert f"no {field} field" in str(err) or f"{field} is not" in str(err)
    assert err.permanent is False


@pytest.mark.parametrize("body", [b"", b"<html>oops</html>", b"[1, 2]", b'"token"', b"\xff\xfe"])
def test_stream_token_response_not_json(body):
    assert "not a JSON object" in str(_service_error(200, body))


def test_error_body_shape():
    body = json.loads(error_body(403, "bot is not a member of the space"))
    assert body == {"type": "about:blank", "title": "Forbidden", "status": 403, "detail": "bot is not a member of the space"}
    err = _service_error(403, error_body(403, "bot is not a member of the space"))
    assert err.permanent
