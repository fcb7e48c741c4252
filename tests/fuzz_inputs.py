"""Seeded input generators for tests/test_fuzz.py: mutations of valid messages.

h11's fuzzing (python-hyper/h11 fuzz/afl-server.py) states the invariant this file serves:
whatever garbage a peer sends, the parser either accepts it or raises RemoteProtocolError,
never anything else. h11 leaves generation to afl; here a `random.Random(seed)` does AFL's
"havoc" stage by hand (bit flips, interesting values, block delete / duplicate / insert,
truncation, extension, splicing with another valid input) on a corpus of VALID messages of
each protocol, plus structure-aware JSON mutations (wrong types, missing and extra fields,
deep nesting, huge strings and numbers, unicode, control characters). Everything is a pure
function of the generator's state, so a failing seed reproduces exactly.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

MESSAGE_CAP = 2**16  # 64 KiB: the media socket's message limit (gateway.server.MAX_MEDIA_MESSAGE)

INTERESTING_8 = (0x00, 0x01, 0x02, 0x03, 0x10, 0x1F, 0x20, 0x3F, 0x40, 0x7F, 0x80, 0x81, 0xC0, 0xFE, 0xFF)
INTERESTING_16 = (0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0x140, 0x13F, 0x141, 0x3FFF, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
# sizes around every boundary our protocols have: RTP header, 20 ms of u-law / slin / PCM16
# 16 kHz, Opus packet limits, the 1 KiB subscribe limit, the 64 KiB message cap
INTERESTING_SIZES = (0, 1, 2, 3, 4, 11, 12, 13, 15, 16, 17, 159, 160, 161, 319, 320, 321, 322, 323, 324, 427, 428,
                     639, 640, 641, 1023, 1024, 1025, 1275, 1276, 1920, 1921, 3825, 3826, 8192, 8193,
                     MESSAGE_CAP - 1, MESSAGE_CAP)

EVIL_STRINGS = (
    "", " ", "a", "\x00", "\x00abc", "\r\n", "\r\nX-Injected: 1", "\x1b[31mred\x1b[0m", "\u202e\u2066rtl", "\ufeff",
    "é", "漢字", "🎵🎶", "\U0001f600" * 65, "a" * 129, "%00", "%ZZ", "../../etc/passwd", "${credential:control_token}",
    "${HOME}", "{}", "[]", "null", "true", "1e999", "-0", "NaN", "\ud800", "\udfff", "<script>", "' OR 1=1 --",
    "\\", '"', "\t\v\f", "\x7f", "\u0085", "\u2028\u2029",
)


def evil_number(rng: random.Random) -> Any:
    return rng.choice((0, -1, 1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**300, 10**400, 1e308, -1e308, 5e-324,
                       0.5, -0.0, 1.0e-7, 4294967296))


def evil_string(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(EVIL_STRINGS)
    if roll < 0.7:
        return "".join(chr(rng.choice((rng.randrange(0, 32), rng.randrange(32, 127), rng.randrange(0x80, 0x800),
                                       rng.randrange(0x800, 0xD800), rng.randrange(0x10000, 0x10FFFF))))
                       for _ in range(rng.randrange(1, 40)))
    if roll < 0.85:
        return rng.choice("aé漢🎵\x00") * rng.choice((100, 1000, 5000, 20000))
    return rng.choice(EVIL_STRINGS) * rng.randrange(2, 50)


def deep(rng: random.Random, depth: int | None = None) -> Any:
    """Nested arrays / objects, `depth` levels (json.dumps cannot write the deepest ones)."""
    depth = depth or rng.choice((10, 100, 900, 2000))
    value: Any = rng.choice((1, "x", None))
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def deep_text(rng: random.Random, limit: int) -> str:
    """Deeply nested JSON as text, up to `limit` characters (e.g. 30,000 "[" then "]")."""
    n = rng.choice((500, 1000, 5000, 20000, limit // 2 - 2))
    n = max(1, min(n, limit // 2 - 2))
    opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
    if opener == "[":
        return "[" * n + "]" * n
    n = max(1, min(n, limit // 7))
    return opener * n + "1" + closer * n


def evil_value(rng: random.Random) -> Any:
    roll = rng.randrange(9)
    if roll == 0:
        return None
    if roll == 1:
        return rng.choice((True, False))
    if roll == 2:
        return evil_number(rng)
    if roll <= 4:
        return evil_string(rng)
    if roll == 5:
        return []
    if roll == 6:
        return {}
    if roll == 7:
        return [evil_value(rng) for _ in range(rng.randrange(1, 4))] if rng.random() < 0.7 else deep(rng)
    return {evil_string(rng)[:20]: evil_value(rng) for _ in range(rng.randrange(1, 4))}


# ------------------------------------------------------------------------------------ bytes
def mutate_bytes(rng: random.Random, data: bytes, corpus: list[bytes] = (), *, cap: int = MESSAGE_CAP) -> bytes:
    """1 to 4 stacked havoc mutations of `data` (AFL's havoc stage), at most `cap` bytes."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(15)
        n = len(buf)
        if op == 0 and n:  # flip one bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # interesting byte
            buf[rng.randrange(n)] = rng.choice(INTERESTING_8)
        elif op == 2 and n >= 2:  # interesting 16-bit value, either byte order (length fields)
            i = rng.randrange(n - 1)
            value = rng.choice(INTERESTING_16 + (n, n - 3, n - 2, n + 1, n - 12))
            buf[i:i + 2] = (value & 0xFFFF).to_bytes(2, rng.choice(("big", "little")))
        elif op == 3 and n:  # random byte
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 4 and n:  # arithmetic on a byte
            i = rng.randrange(n)
            buf[i] = (buf[i] + rng.randrange(-35, 36)) & 0xFF
        elif op == 5 and n:  # delete a block
            i = rng.randrange(n)
            del buf[i:i + rng.randrange(1, max(2, n - i + 1))]
        elif op == 6 and n:  # duplicate a block
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 64))
            buf[i:i] = buf[i:j]
        elif op == 7:  # insert random bytes
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.randrange(1, 32))
        elif op == 8:  # truncate
            del buf[rng.randrange(n + 1):]
        elif op == 9:  # extend (zeros, random, or a repeat of itself)
            k = rng.choice((1, 2, 3, 16, 160, 1000))
            buf += rng.choice((bytes(k), rng.randbytes(k), bytes(buf[:k])))
        elif op == 10 and corpus:  # splice with another valid input
            other = rng.choice(corpus)
            buf = buf[:rng.randrange(n + 1)] + bytearray(other[rng.randrange(len(other) + 1):])
        elif op == 11 and corpus:  # concatenate two valid inputs
            buf += rng.choice(corpus)
        elif op == 12:  # resize to an interesting length
            size = rng.choice(INTERESTING_SIZES)
            buf = (buf * (size // max(1, n) + 1))[:size] if n else bytearray(size)
        elif op == 13 and n:  # overwrite a block with one value
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 64))
            buf[i:j] = bytes([rng.choice(INTERESTING_8)]) * (j - i)
        else:  # whole random message
            buf = bytearray(rng.randbytes(rng.choice((0, 1, 2, 3, 12, 40, 160, 320, 700))))
    return bytes(buf[:cap])


def mutate_text(rng: random.Random, text: str, corpus: list[str] = (), *, cap: int = MESSAGE_CAP) -> str:
    """Byte-level havoc on the UTF-8 of `text`, decoded back (a WebSocket text message is
    valid UTF-8 whatever it holds)."""
    raw = mutate_bytes(rng, text.encode(), [c.encode() for c in corpus], cap=cap)
    return raw.decode("utf-8", "replace")[: cap // 3]


# ------------------------------------------------------------------------------------- JSON
def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if len(path) >= 12:  # nodes of a deep value below this are left alone
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, path + (i,))
    return out


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        copy[head] = _replace(value[head], rest, new)
        return copy
    copy = list(value)
    copy[head] = _replace(value[head], rest, new)
    return copy


def mutate_json(rng: random.Random, value: Any) -> Any:
    """A structural mutation of a JSON value: a node gets another type or an evil value, a key
    goes missing or an unknown one appears, or the whole value is wrapped or replaced."""
    for _ in range(rng.choice((1, 1, 2, 3))):
        paths = _paths(value)
        path = rng.choice(paths)
        node = value
        for p in path:
            node = node[p]
        op = rng.randrange(7)
        if op <= 2:
            value = _replace(value, path, evil_value(rng))
        elif op == 3 and isinstance(node, dict) and node:
            key = rng.choice(list(node))
            value = _replace(value, path, {k: v for k, v in node.items() if k != key})
        elif op == 4 and isinstance(node, dict):
            value = _replace(value, path, {**node, evil_string(rng)[:30]: evil_value(rng)})
        elif op == 5 and isinstance(node, str):
            value = _replace(value, path, rng.choice((node * rng.randrange(2, 100), node[: rng.randrange(len(node) + 1)],
                                                     node + evil_string(rng), node.upper(), " " + node)))
        else:
            value = _replace(value, path, rng.choice(([node], {"value": node}, [node, node])))
    return value


def dumps_any(rng: random.Random, value: Any, *, cap: int = MESSAGE_CAP) -> str:
    """`value` as JSON text, spaced or compact, ASCII-escaped or not (lone surrogates are
    always escaped: the text must be valid UTF-8); values json cannot write become a deep
    text of their own."""
    try:
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5, separators=rng.choice(((",", ":"), (", ", ": "))))
        text.encode()
    except (ValueError, RecursionError, UnicodeEncodeError):
        try:
            text = json.dumps(value, ensure_ascii=True)
        except (ValueError, RecursionError):
            text = deep_text(rng, cap)
    return text


RAW_JSON = ("", " ", "{", "}", "[", "{}", "[]", "null", "0", '""', "NaN", "Infinity", "-Infinity", '{"a":NaN}',
            '{"a":1,}', "{'a': 1}", '{"a":1}{"b":2}', "\ufeff{}", "/*c*/{}", '{"a":1e99999}', '{"a":' + "9" * 5000 + "}",
            '{"a":"\\ud800"}', '{"a":"\\x00"}', '{"a":"\\u0000"}', '{"event":"start","event":"stop"}', "\x00", "true false")


def json_message(rng: random.Random, valid: Any, *, cap: int = MESSAGE_CAP, corpus: list[str] = ()) -> str:
    """A mutated JSON text message starting from the `valid` value: structural (most), raw
    text havoc, a raw malformed document, or deep nesting."""
    roll = rng.random()
    if roll < 0.55:
        return dumps_any(rng, mutate_json(rng, valid), cap=cap)[:cap]
    if roll < 0.8:
        return mutate_text(rng, json.dumps(valid), list(corpus), cap=cap)
    if roll < 0.92:
        return rng.choice(RAW_JSON)
    return deep_text(rng, min(cap, 60_000))


def pick(rng: random.Random, weighted: list[tuple[float, Callable[[], Any]]]) -> Any:
    """Call one of the `(weight, make)` pairs, chosen by weight."""
    total = sum(w for w, _ in weighted)
    x = rng.random() * total
    for w, make in weighted:
        x -= w
        if x <= 0:
            return make()
    return weighted[-1][1]()


# ------------------------------------------------------------------------------------- Opus
_OPUS: dict[str, list[bytes]] = {}


def opus_corpus() -> list[bytes]:
    """Valid Opus packets (libopus): mono and stereo, 10 to 60 ms, speech-like and silent,
    and the multi-frame codes built from them (RFC 6716 §3.2: code 1 two equal frames, code 2
    two frames with a length, code 3 with a frame count and padding)."""
    if "all" in _OPUS:
        return _OPUS["all"]
    import numpy as np
    import opuslib

    rng = np.random.default_rng(7)
    packets: list[bytes] = []
    for channels in (1, 2):
        encoder = opuslib.Encoder(48000, channels, opuslib.APPLICATION_AUDIO)
        for ms in (10, 20, 40, 60):
            n = 48 * ms
            t = np.arange(n) / 48000
            for pcm in (np.zeros(n), 8000 * np.sin(2 * np.pi * 440 * t), rng.normal(0, 3000, n)):
                frame = np.repeat(pcm[:, None], channels, axis=1).astype("<i2").tobytes()
                packets.append(encoder.encode(frame, n))
    code0 = [p for p in packets if p[0] & 3 == 0 and len(p) > 3]
    for p in code0[:6]:
        toc, body = p[0] & ~3, p[1:]
        packets.append(bytes([toc | 1]) + body + body)  # code 1: two frames of equal size
        packets.append(bytes([toc | 2, len(body)]) + body + body[: len(body) // 2])  # code 2
        packets.append(bytes([toc | 3, 0x02]) + body + body)  # code 3, CBR, two frames
        packets.append(bytes([toc | 3, 0x42, 3]) + body + body + bytes(3))  # code 3, padding 3
    _OPUS["all"] = packets
    return packets


def ogg_page(body_packets: list[bytes], *, serial: int, sequence: int, granule: int, flags: int) -> bytes:
    """One Ogg page (RFC 3533 §6) holding whole `body_packets`, CRC filled in."""
    import struct

    from gateway.codecs.ogg import ogg_crc

    lacing = bytearray()
    for packet in body_packets:
        n = len(packet)
        lacing += b"\xff" * (n // 255) + bytes([n % 255])
    header = b"OggS" + struct.pack("<BBqIII", 0, flags, granule, serial, sequence, 0) + bytes([len(lacing)]) + bytes(lacing)
    page = bytearray(header + b"".join(body_packets))
    page[22:26] = struct.pack("<I", ogg_crc(page))
    return bytes(page)


def ogg_stream(rng: random.Random, packets: list[bytes], *, channels: int = 1) -> bytes:
    """A valid Ogg Opus stream (RFC 7845: OpusHead, OpusTags, then audio pages)."""
    import struct

    serial = rng.randrange(2**32)
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, channels, 312, 48000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"fuzz" + struct.pack("<I", 0)
    pages = [ogg_page([head], serial=serial, sequence=0, granule=0, flags=0x02),
             ogg_page([tags], serial=serial, sequence=1, granule=0, flags=0)]
    granule, seq = 0, 2
    for i in range(0, len(packets), 3):
        chunk = packets[i:i + 3]
        granule += 960 * len(chunk)
        last = i + 3 >= len(packets)
        pages.append(ogg_page(chunk, serial=serial, sequence=seq, granule=granule, flags=0x04 if last else 0))
        seq += 1
    return b"".join(pages)


def split(rng: random.Random, data: bytes, parts: int) -> list[bytes]:
    """`data` cut at `parts - 1` random offsets (a stream piped into a socket)."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(parts - 1))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
