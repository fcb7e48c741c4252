"""The Ogg Opus demuxer (gateway/codecs/ogg.py) against real Ogg Opus files, no event loop.

Streams are made from recorded speech by FFmpeg's own muxer and libopus (PyAV), and the
packets our demuxer returns are compared, byte for byte, with what FFmpeg's Ogg demuxer
returns for the same file. Streams with shapes FFmpeg does not produce (tiny pages, one packet
over many pages, foreign pages, corruption) come from a small writer here, whose output FFmpeg
is made to read back first, so the writer is checked too. The CRC is checked against a plain
bit-by-bit implementation of RFC 3533's description.
"""

from __future__ import annotations

import io
import os
import random
import struct
import timeit
from fractions import Fraction

import av
import numpy as np
import pytest

from audio_checks import read_wav
from conftest import ASSETS
from gateway.codecs.ogg import (
    MAX_PACKET_BYTES,
    MAX_PAGE_BYTES,
    OggOpusDemuxer,
    OpusHead,
    looks_like_ogg,
    ogg_crc,
)
from gateway.errors import RemoteProtocolError

# --- references and writers -------------------------------------------------------------


def _bitwise_crc(data: bytes) -> int:
    """RFC 3533 §6 read literally: CRC-32, generator 0x04C11DB7, MSB first, initial value 0,
    no final xor; bit by bit."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


_TABLE = [_bitwise_crc(bytes([i])) for i in range(256)]  # the CRC of each byte value alone


def reference_crc(data: bytes) -> int:
    """The same CRC, a byte at a time through the 256-entry table (libogg's loop, in Python)."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _TABLE[(crc >> 24) ^ byte]
    return crc


def pages_of(data: bytes) -> list[dict]:
    """Walk a well-formed stream page by page (no resync): offset, size and header fields."""
    pages, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS", pos
        flags, granule, serial, sequence, crc, segments = struct.unpack_from("<BqIIIB", data, pos + 5)
        lacing = data[pos + 27 : pos + 27 + segments]
        size = 27 + segments + sum(lacing)
        pages.append(dict(offset=pos, size=size, flags=flags, granule=granule, serial=serial, sequence=sequence,
                          crc=crc, lacing=bytes(lacing)))
        pos += size
    return pages


def pyav_packets(data: bytes) -> list[bytes]:
    """The audio packets FFmpeg's Ogg demuxer returns (without its empty end-of-file packet)."""
    with av.open(io.BytesIO(data), format="ogg") as container:
        stream = container.streams.audio[0]
        return [bytes(packet) for packet in container.demux(stream) if packet.size]


def encode_ogg_opus(pcm: np.ndarray, rate: int, *, channels: int = 1, frame_ms: int = 20, bitrate: int | None = None,
                    cbr: bool = False, page_duration_us: int | None = None) -> bytes:
    """An Ogg Opus stream made by FFmpeg (libopus, its ogg muxer) from int16 mono `pcm`."""
    buf = io.BytesIO()
    options = {"page_duration": str(page_duration_us)} if page_duration_us else {}
    layout = "mono" if channels == 1 else "stereo"
    with av.open(buf, "w", format="ogg", container_options=options) as container:
        codec_options = {"frame_duration": str(frame_ms)}
        if cbr:
            codec_options["vbr"] = "off"
        stream = container.add_stream("libopus", rate=48000, layout=layout, options=codec_options)
        if bitrate:
            stream.codec_context.bit_rate = bitrate
        resampler = av.AudioResampler(format="s16", layout=layout, rate=48000)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(chunk):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def opus_head(channels: int = 1, pre_skip: int = 312, rate: int = 48000, gain: int = 0, family: int = 0,
              table: bytes = b"", version: int = 1) -> bytes:
    return b"OpusHead" + struct.pack("<BBHIhB", version, channels, pre_skip, rate, gain, family) + table


OPUS_TAGS = b"OpusTags" + struct.pack("<I", 7) + b"gateway" + struct.pack("<I", 0)


def page(packets_part: list[tuple[bytes, bool]], *, serial: int, sequence: int, granule: int, flags: int = 0,
         crc: int | None = None) -> bytes:
    """One page holding pieces of packets: (bytes, ends_here). A piece that does not end its
    packet must be a multiple of 255 bytes and the page's last."""
    lacing = bytearray()
    for piece, ends in packets_part:
        full, rest = divmod(len(piece), 255)
        lacing += b"\xff" * full
        if ends:
            lacing.append(rest)
        else:
            assert rest == 0
    assert len(lacing) <= 255
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing))
    raw = header + bytes(lacing) + b"".join(piece for piece, _ in packets_part)
    value = reference_crc(raw) if crc is None else crc
    return raw[:22] + struct.pack("<I", value) + raw[26:]


def write_ogg(packets: list[bytes], *, serial: int = 0x1234ABCD, max_segments: int = 255, samples: int = 960,
              head: bytes | None = None, tags: bytes = OPUS_TAGS, first_sequence: int = 0) -> list[bytes]:
    """An Ogg Opus stream as a list of pages (RFC 7845 layout: OpusHead alone on a BOS page,
    OpusTags on its own page(s), audio from a fresh page, EOS on the last). Pages hold at most
    `max_segments` lacing values, so small values make packets span pages."""
    head = opus_head() if head is None else head
    sequence = first_sequence

    def paginate(stream_packets, granules, first_flags, last_flags):
        nonlocal sequence
        out, pieces, segments, continued, granule = [], [], 0, False, -1

        def flush(extra_flags=0):
            nonlocal sequence, pieces, segments, continued, granule
            flags = (0x01 if continued else 0) | (first_flags if not out else 0) | extra_flags
            out.append(page(pieces, serial=serial, sequence=sequence, granule=granule, flags=flags))
            sequence += 1
            continued = bool(pieces) and not pieces[-1][1]  # the next page goes on with it
            pieces, segments, granule = [], 0, -1

        for packet, packet_granule in zip(stream_packets, granules):
            rest = packet
            while True:
                need, room = len(rest) // 255 + 1, max_segments - segments
                if need <= room:
                    pieces.append((rest, True))
                    segments += need
                    granule = packet_granule
                    break
                if room:
                    pieces.append((rest[: room * 255], False))
                    rest = rest[room * 255 :]
                    segments += room
                flush()
        flush(last_flags)
        return out

    pages = paginate([head], [0], 0x02, 0)
    pages += paginate([tags], [0], 0, 0)
    granules = [312 + samples * (k + 1) for k in range(len(packets))]
    pages += paginate(packets, granules, 0, 0x04)
    return pages


def demux_all(data: bytes, cuts=None) -> tuple[list[bytes], OggOpusDemuxer]:
    """Feed `data` whole, or cut at the offsets in `cuts`; every packet returned."""
    demuxer = OggOpusDemuxer()
    if cuts is None:
        return demuxer.feed(data), demuxer
    out, last = [], 0
    for cut in [*cuts, len(data)]:
        out += demuxer.feed(data[last:cut])
        last = cut
    return out, demuxer


# --- fixtures: real speech, encoded by FFmpeg -------------------------------------------


@pytest.fixture(scope="module")
def speech():
    pcm, rate = read_wav(ASSETS / "or105.wav")  # 8.4 s, 8 kHz mono
    return pcm[:, 0], rate


@pytest.fixture(scope="module")
def speech_ogg(speech) -> bytes:
    """8.4 s of speech, mono, 20 ms packets: FFmpeg's default 1 s pages."""
    return encode_ogg_opus(*speech)


@pytest.fixture(scope="module")
def spanning_ogg(speech) -> bytes:
    """Stereo 510 kb/s CBR, 60 ms packets of 3825 bytes (15 segments of 255, so each ends
    with a 0-length segment), 5 s pages: the segment table fills and packets span pages."""
    return encode_ogg_opus(*speech, channels=2, frame_ms=60, bitrate=510000, cbr=True, page_duration_us=5_000_000)


@pytest.fixture(scope="module")
def short_ogg(speech) -> bytes:
    """0.3 s of speech with 100 ms pages: small enough to split at every byte offset."""
    pcm, rate = speech
    return encode_ogg_opus(pcm[int(0.5 * rate) : int(0.8 * rate)], rate, page_duration_us=100_000)


# --- CRC ----------------------------------------------------------------------------------


def test_crc_is_rfc3533s_and_fast(speech_ogg):
    assert ogg_crc(b"123456789") == reference_crc(b"123456789") == _bitwise_crc(b"123456789") == 0x89A1897F
    rng = random.Random(3533)
    for size in (0, 1, 2, 3, 4, 27, 255, 1000):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert ogg_crc(data) == reference_crc(data) == _bitwise_crc(data), size
        assert ogg_crc(bytearray(data)) == ogg_crc(memoryview(data)) == ogg_crc(data)
    # every page FFmpeg wrote checks out with both implementations
    for p in pages_of(speech_ogg)[:4]:
        raw = bytearray(speech_ogg[p["offset"] : p["offset"] + p["size"]])
        raw[22:26] = bytes(4)
        assert ogg_crc(raw) == reference_crc(bytes(raw)) == p["crc"]
    # C speed: a maximum page well under a millisecond (a Python loop over its bytes: ~15 ms)
    big = os.urandom(MAX_PAGE_BYTES)
    assert min(timeit.repeat(lambda: ogg_crc(big), number=10, repeat=3)) / 10 < 0.001


def test_looks_like_ogg(speech_ogg):
    for data in (speech_ogg[:4], memoryview(speech_ogg), bytearray(speech_ogg[:100])):
        assert looks_like_ogg(data)
    for other in (b"", b"Ogg", b"OggX....", b"\x10\x01\x40", b"RIFF....WAVE", b"oggs"):
        assert not looks_like_ogg(other)


# --- demuxing what FFmpeg writes ----------------------------------------------------------


def test_packets_are_exactly_ffmpegs(speech_ogg):
    expected = pyav_packets(speech_ogg)
    assert len(expected) == 421  # 8.4025 s in 20 ms packets
    packets, demuxer = demux_all(speech_ogg)
    assert packets == expected
    head = demuxer.head
    assert (head.version, head.channels, head.input_sample_rate, head.output_gain) == (1, 1, 48000, 0)
    assert head.mapping_family == 0
    assert head.pre_skip == 312 and head.stream_count == 1 and head.coupled_count == 0 and head.mapping == b"\x00"
    pages = pages_of(speech_ogg)
    assert demuxer.eos and pages[-1]["flags"] & 0x04
    assert demuxer.granule == pages[-1]["granule"]
    assert demuxer.serial == pages[0]["serial"] and demuxer.pages == len(pages)
    assert demuxer.packets == 421 and demuxer.buffered == 0
    counters = demuxer.skipped_bytes, demuxer.bad_pages, demuxer.lost_pages, demuxer.dropped_packets, demuxer.ignored_pages
    assert counters == (0, 0, 0, 0, 0)


def test_packets_spanning_pages_are_exactly_ffmpegs(spanning_ogg):
    pages = pages_of(spanning_ogg)
    assert sum(1 for p in pages if p["flags"] & 0x01) >= 5  # FFmpeg did continue packets on later pages
    assert any(p["lacing"][-1] == 255 for p in pages) and any(0 in p["lacing"] for p in pages)
    expected = pyav_packets(spanning_ogg)
    assert len(expected) > 100 and {len(p) for p in expected} == {3825}
    packets, demuxer = demux_all(spanning_ogg)
    assert packets == expected
    assert demuxer.head.channels == 2 and demuxer.head.coupled_count == 1 and demuxer.eos
    # a spanning packet is carried between pages, never more than one packet
    demuxer = OggOpusDemuxer()
    got = []
    for p in pages:
        got += demuxer.feed(spanning_ogg[p["offset"] : p["offset"] + p["size"]])
        assert demuxer.buffered <= 3825
    assert got == expected


def test_split_at_every_offset_gives_the_same_packets(short_ogg):
    expected = pyav_packets(short_ogg)
    assert len(pages_of(short_ogg)) >= 5 and len(expected) == 16  # 0.3 s and the pre-skip
    for cut in range(len(short_ogg) + 1):
        packets, demuxer = demux_all(short_ogg, [cut])
        assert packets == expected, cut
        assert demuxer.eos and demuxer.bad_pages == 0 and demuxer.skipped_bytes == 0


@pytest.mark.parametrize("name", ["speech_ogg", "spanning_ogg"])
def test_split_around_every_page_boundary_and_byte_by_byte(request, name):
    data = request.getfixturevalue(name)
    expected = pyav_packets(data)
    for p in pages_of(data):
        for edge in (p["offset"], p["offset"] + 27 + len(p["lacing"])):  # page start, body start
            for cut in range(max(0, edge - 30), min(len(data), edge + 30)):
                assert demux_all(data, [cut])[0] == expected, cut
    rng = random.Random(name)
    cuts = sorted(rng.sample(range(1, len(data)), 400))
    assert demux_all(data, cuts)[0] == expected
    if name == "speech_ogg":  # one byte per message
        assert demux_all(data, range(1, len(data)))[0] == expected


def test_the_writer_here_is_read_by_ffmpeg_and_packets_span_many_pages(speech_ogg):
    packets = pyav_packets(speech_ogg)[:40]
    big = packets[10] * 8  # one packet over several 3-segment pages
    stream = packets[:20] + [big] + packets[20:]
    for max_segments in (255, 7, 3, 1):
        data = b"".join(write_ogg(stream, max_segments=max_segments))
        assert pyav_packets(data) == stream, max_segments  # FFmpeg agrees with the writer
        assert demux_all(data)[0] == stream
        assert demux_all(data, range(1, len(data), 97))[0] == stream


# --- what is not a clean stream -------------------------------------------------------------


def test_a_page_with_a_bad_crc_is_skipped_counted_and_the_stream_goes_on(speech_ogg):
    pages = pages_of(speech_ogg)
    expected = pyav_packets(speech_ogg)
    ends = [sum(1 for v in p["lacing"] if v < 255) for p in pages[2:]]  # audio packets per page
    bad = pages[4]  # the third audio page
    data = bytearray(speech_ogg)
    data[bad["offset"] + bad["size"] // 2] ^= 0x20
    packets, demuxer = demux_all(bytes(data))
    first, count = sum(ends[:2]), ends[2]
    assert packets == expected[:first] + expected[first + count :]
    assert demuxer.bad_pages == 1 and demuxer.lost_pages == 1 and demuxer.dropped_packets == 0
    assert demuxer.skipped_bytes == bad["size"]
    assert demuxer.eos and demuxer.packets == len(expected) - count
    for cut in range(bad["offset"] - 5, bad["offset"] + bad["size"] + 5, 7):  # split anywhere: same
        assert demux_all(bytes(data), [cut])[0] == packets


def test_a_lost_page_in_the_middle_of_spanning_packets_drops_only_those(spanning_ogg):
    pages = pages_of(spanning_ogg)
    expected = pyav_packets(spanning_ogg)
    # an audio page that continues a packet and ends mid-packet: both packets are cut
    index = next(i for i, p in enumerate(pages) if i > 3 and p["flags"] & 0x01 and p["lacing"][-1] == 255)
    bad = pages[index]
    data = bytearray(spanning_ogg)
    data[bad["offset"] + 100] ^= 0xFF
    packets, demuxer = demux_all(bytes(data))
    done_before = sum(sum(1 for v in p["lacing"] if v < 255) for p in pages[2:index])
    on_page = sum(1 for v in bad["lacing"] if v < 255)  # packets ending on the bad page
    # lost: those ending on the bad page, and the one that started on it and ends after it
    assert packets == expected[:done_before] + expected[done_before + on_page + 1 :]
    assert demuxer.bad_pages == 1 and demuxer.lost_pages == 1 and demuxer.dropped_packets == 1
    assert demuxer.eos


def test_garbage_before_between_and_lost_sync_mid_page(speech_ogg):
    pages = pages_of(speech_ogg)
    expected = pyav_packets(speech_ogg)
    chunks = [speech_ogg[p["offset"] : p["offset"] + p["size"]] for p in pages]
    junk = b"\x00garbage\xffOgg"  # ends with a partial capture pattern
    data = junk + chunks[0] + chunks[1] + junk + b"".join(chunks[2:5]) + b"Og" + b"".join(chunks[5:])
    packets, demuxer = demux_all(data)
    assert packets == expected and demuxer.skipped_bytes == 2 * len(junk) + 2 and demuxer.bad_pages == 0
    # a page cut short (its end lost on the way): the next page is found again
    cut = chunks[3][: len(chunks[3]) // 2]
    data = b"".join(chunks[:3]) + cut + b"".join(chunks[4:])
    packets, demuxer = demux_all(data)
    ends = [sum(1 for v in p["lacing"] if v < 255) for p in pages[2:]]
    assert packets == expected[: sum(ends[:1])] + expected[sum(ends[:2]) :]
    assert demuxer.lost_pages == 1 and demuxer.bad_pages >= 1 and demuxer.skipped_bytes >= len(cut)
    assert demuxer.eos


def test_pages_of_other_streams_and_after_eos_are_ignored(speech_ogg):
    expected = pyav_packets(speech_ogg)
    ours = [speech_ogg[p["offset"] : p["offset"] + p["size"]] for p in pages_of(speech_ogg)]
    other = write_ogg(expected[:30], serial=0xBEEF)  # another Opus track (grouped), then chained
    data = ours[0] + other[0] + ours[1] + other[1] + ours[2] + other[2] + b"".join(ours[3:]) + b"".join(other[3:])
    assert pyav_packets(data) == expected  # FFmpeg reads the first track
    packets, demuxer = demux_all(data)
    assert packets == expected and demuxer.ignored_pages == len(other) and demuxer.eos
    chained = b"".join(ours) + b"".join(write_ogg(expected[:10], serial=0xC4A1))  # a second link
    packets, demuxer = demux_all(chained)
    assert packets == expected and demuxer.ignored_pages > 0


def test_granule_and_eos_follow_the_pages(speech_ogg):
    pages = pages_of(speech_ogg)
    demuxer = OggOpusDemuxer()
    for p in pages:
        demuxer.feed(speech_ogg[p["offset"] : p["offset"] + p["size"]])
        assert demuxer.granule == p["granule"]
        assert demuxer.eos == bool(p["flags"] & 0x04)
    assert demuxer.feed(b"") == []


def test_packet_split_over_3_pages_with_zero_length_segment_and_empty_packet():
    packets = [b"\xf8" + bytes(509), b"\xfc\xff\xfe", b"", b"\xf8" + bytes(254)]  # 510 = 2x255: ends with a 0
    data = b"".join(write_ogg(packets, max_segments=1))
    assert demux_all(data)[0] == [packets[0], packets[1], packets[3]]  # the empty one carries no audio


# --- not Ogg Opus -----------------------------------------------------------------------------


def encode_other(codec: str) -> bytes:
    buf = io.BytesIO()
    options = {"strict": "experimental"} if codec == "vorbis" else {}
    layout = "stereo" if codec == "vorbis" else "mono"
    with av.open(buf, "w", format="ogg") as container:
        stream = container.add_stream(codec, rate=48000, layout=layout, options=options)
        tone = np.sin(np.arange(48000) / 10)
        if codec == "vorbis":
            planes = np.stack([tone, tone]).astype(np.float32) * 0.3
            frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        else:
            samples = (tone * 10000).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = 48000, 0, Fraction(1, 48000)
        for packet in stream.encode(frame) + stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("codec, name", [("vorbis", "Vorbis"), ("flac", "FLAC")])
def test_ogg_of_another_codec_is_refused_with_1007(codec, name):
    data = encode_other(codec)
    assert looks_like_ogg(data)
    with pytest.raises(RemoteProtocolError) as info:
        OggOpusDemuxer().feed(data)
    assert info.value.close_code == 1007 and f"{name} header, not OpusHead" in str(info.value)
    demuxer = OggOpusDemuxer()  # cut anywhere: it raises once the first packet is whole
    with pytest.raises(RemoteProtocolError):
        for i in range(0, len(data), 11):
            demuxer.feed(data[i : i + 11])


@pytest.mark.parametrize(
    "head, fragment",
    [
        (b"OpusHeaX" + bytes(11), "not OpusHead"),
        (b"Speex   " + bytes(72), "Speex header"),
        (opus_head()[:18], "18 bytes, expected at least 19"),
        (opus_head(version=0x10), "version 16"),
        (opus_head(channels=0), "channel count is 0"),
        (opus_head(channels=3), "family 0 with 3 channels"),
        (opus_head(channels=3, family=1, table=b"\x02\x01\x00\x01"), "needs 24"),
        (opus_head(channels=2, family=1, table=b"\x00\x00\x00\x01"), "stream count 0"),
        (opus_head(channels=2, family=1, table=b"\x01\x02\x00\x01"), "stream count 1 with 2 coupled"),
        (opus_head(channels=2, family=1, table=b"\x01\x00\x00\x03"), "beyond 1"),
        (opus_head(channels=9, family=1, table=b"\x05\x04" + bytes(9)), "at most 8"),
    ],
)
def test_invalid_opus_head_is_refused_with_1007(head, fragment):
    data = b"".join(write_ogg([b"\xf8\x01\x02"], head=head))
    with pytest.raises(RemoteProtocolError) as info:
        OggOpusDemuxer().feed(data)
    assert info.value.close_code == 1007 and fragment in str(info.value), str(info.value)
    assert len(str(info.value).encode()) <= 123  # fits a WebSocket close reason


def test_valid_heads_of_other_families_and_versions():
    fields = ("channels", "pre_skip", "input_sample_rate", "output_gain_db", "mapping_family", "stream_count",
              "coupled_count", "mapping")
    cases = [
        (opus_head(channels=2, pre_skip=3840, rate=16000, gain=-256), (2, 3840, 16000, -1.0, 0, 1, 1, b"\x00\x01")),
        (opus_head(channels=3, family=1, table=b"\x02\x01\x00\x02\x01"), (3, 312, 48000, 0.0, 1, 2, 1, b"\x00\x02\x01")),
        (opus_head(channels=2, family=255, table=b"\x02\x00\x00\xff"), (2, 312, 48000, 0.0, 255, 2, 0, b"\x00\xff")),
        # a minor revision with a field appended
        (opus_head(version=15) + b"future", (1, 312, 48000, 0.0, 0, 1, 0, b"\x00")),
    ]
    for head, expected in cases:
        packets, demuxer = demux_all(b"".join(write_ogg([b"\xf8\x01\x02"], head=head)))
        assert packets == [b"\xf8\x01\x02"]
        assert tuple(getattr(demuxer.head, name) for name in fields) == expected
    assert OpusHead.parse(opus_head(gain=384)).output_gain_db == 1.5


def test_first_page_not_bos_and_second_packet_not_tags_are_refused():
    pages = write_ogg([b"\xf8\x01\x02"])
    with pytest.raises(RemoteProtocolError, match="not a beginning-of-stream page") as info:
        OggOpusDemuxer().feed(b"".join(pages[1:]))  # joined in the middle: no OpusHead
    assert info.value.close_code == 1007 and len(str(info.value).encode()) <= 123
    with pytest.raises(RemoteProtocolError, match="second packet is not OpusTags") as info:
        OggOpusDemuxer().feed(b"".join(write_ogg([b"\xf8\x01\x02"], tags=b"OpusTagz" + bytes(8))))
    assert info.value.close_code == 1007 and len(str(info.value).encode()) <= 123


# --- bounded memory -----------------------------------------------------------------------------


class Watched(OggOpusDemuxer):
    """Records the largest input buffer seen inside `feed`, not only between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def _parse(self, out):
        self.peak = max(self.peak, len(self._buffer))
        super()._parse(out)


def test_buffer_is_bounded_by_one_page_even_for_one_huge_message(spanning_ogg):
    demuxer = Watched()
    assert demuxer.feed(spanning_ogg) == pyav_packets(spanning_ogg)  # 540 KB in one message
    assert len(spanning_ogg) > 8 * MAX_PAGE_BYTES and demuxer.peak <= MAX_PAGE_BYTES
    # lost sync for a megabyte: only a possible capture-pattern prefix is kept
    junk = Watched()
    assert junk.feed(os.urandom(1 << 20).replace(b"OggS", b"oggs") + b"Og") == []
    assert junk.buffered == 2 and junk.peak <= MAX_PAGE_BYTES and junk.skipped_bytes == (1 << 20)
    # a false capture pattern declaring a maximum page: held until it can be checked, then rejected
    false = Watched()
    fake = b"OggS\x00\x02" + bytes(20) + b"\xff" + b"\xff" * 255
    assert false.feed(fake + os.urandom(3 * MAX_PAGE_BYTES).replace(b"OggS", b"oggs")) == []
    assert false.peak <= MAX_PAGE_BYTES and false.bad_pages == 1 and false.buffered <= 3


def test_a_packet_over_the_bound_is_refused_with_1009_and_huge_tags_are_skipped():
    too_big = b"\xf8" + bytes(MAX_PACKET_BYTES)
    with pytest.raises(RemoteProtocolError) as info:
        OggOpusDemuxer().feed(b"".join(write_ogg([too_big])))
    assert info.value.close_code == 1009 and "64 KiB" in str(info.value)
    at_bound = b"\xf8" + bytes(MAX_PACKET_BYTES - 1)
    assert demux_all(b"".join(write_ogg([at_bound])))[0] == [at_bound]
    # OpusTags with 300 KB of cover art: skipped, not buffered
    tags = b"OpusTags" + struct.pack("<I", 0) + struct.pack("<I", 1) + struct.pack("<I", 300_000) + bytes(300_000)
    data = b"".join(write_ogg([b"\xf8\x01\x02"] * 3, tags=tags))
    demuxer = Watched()
    out = []
    for i in range(0, len(data), 4096):
        out += demuxer.feed(data[i : i + 4096])
        assert demuxer.buffered <= MAX_PAGE_BYTES + 8
    assert out == [b"\xf8\x01\x02"] * 3


def test_fuzz_never_raises_anything_but_remote_protocol_error(short_ogg):
    rng = random.Random(7845)
    outcomes = set()
    for _ in range(300):
        data = bytearray(short_ogg)
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            if op == 0:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                start = rng.randrange(len(data))
                del data[start : start + rng.randrange(200)]
            else:
                at = rng.randrange(len(data))
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(50)))
        demuxer = OggOpusDemuxer()
        try:
            for i in range(0, len(data), 333):
                for packet in demuxer.feed(bytes(data[i : i + 333])):
                    assert isinstance(packet, bytes) and packet
            outcomes.add("ok")
        except RemoteProtocolError as err:
            assert err.close_code in (1007, 1009)
            outcomes.add(err.close_code)
        assert demuxer.buffered <= MAX_PAGE_BYTES + MAX_PACKET_BYTES
    assert "ok" in outcomes
