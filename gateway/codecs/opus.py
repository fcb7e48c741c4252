"""Opus encoder and decoder stages (RFC 6716) over libopus, through opuslib's ctypes binding.

opuslib 3.0.1 owns the codec states (`opuslib.Encoder` / `opuslib.Decoder`, freed in their
`__del__`), but its per-call wrappers are not used on the frame path: `Encoder.encode`
allocates an output buffer as large as the input, `Decoder.decode` converts the PCM through a
Python list of ints, `Decoder.decode(None, ...)` (PLC) fails on `len(None)`, and the `dtx` and
`inband_fec` property setters are broken (they call the getter, or drop the value). So this
module calls `opus_encode` / `opus_decode` itself with buffers allocated once per stream, and
sets CTLs through `opuslib.api.*.encoder_ctl`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Literal

import attrs
import numpy as np
import opuslib
import opuslib.api
import opuslib.api.ctl
import opuslib.api.decoder
import opuslib.api.encoder

from gateway.codecs.formats import (
    OPUS_48K,
    OPUS_48K_STEREO,
    AudioFormat,
    AudioFrame,
    EncodedFrame,
    Encoding,
    Frame,
)
from gateway.codecs.stage import check_encoded, check_pcm
from gateway.errors import CloseCode, LocalProtocolError, RemoteProtocolError

OPUS_RATE = 48000  # Hz; Opus packets are timed (RTP, Ogg granules, durations) at 48 kHz here
#: Input rates (Hz) libopus encodes (RFC 6716 §2): every packet decodes at 48 kHz whatever the input.
OPUS_INPUT_RATES = (8000, 12000, 16000, 24000, 48000)
#: The widest audio band each input rate carries (OPUS_SET_MAX_BANDWIDTH): narrowband (4 kHz)
#: for 8 kHz input, mediumband (6 kHz) for 12, wideband (8 kHz) for 16, super-wideband (12 kHz)
#: for 24, fullband (20 kHz) for 48 (RFC 6716 §2, Table 1).
OPUS_MAX_BANDWIDTH = {
    8000: opuslib.BANDWIDTH_NARROWBAND,
    12000: opuslib.BANDWIDTH_MEDIUMBAND,
    16000: opuslib.BANDWIDTH_WIDEBAND,
    24000: opuslib.BANDWIDTH_SUPERWIDEBAND,
    48000: opuslib.BANDWIDTH_FULLBAND,
}
SAMPLES_PER_MS = OPUS_RATE // 1000
PLC_GRANULE = OPUS_RATE // 400  # 120 samples = 2.5 ms: PLC/FEC sizes are multiples of this
MAX_FRAME_SAMPLES = 5760  # 120 ms at 48 kHz, the longest packet (RFC 6716 §3.2.5)
MAX_PACKET_BYTES = 4000  # output buffer; libopus's recommended maximum packet size
#: Frame durations (ms) the encoder takes: 2.5 ms is not a whole ms; 80-120 ms need libopus >= 1.2.
OPUS_PTIMES_MS = (5, 10, 20, 40, 60, 80, 100, 120)
OPUS_FRAME_SAMPLES = frozenset([PLC_GRANULE] + [ms * SAMPLES_PER_MS for ms in OPUS_PTIMES_MS])
#: bit/s per channel asked for when no bitrate is set, by input rate (8, 12 and 16 kHz, where
#: libopus's automatic choice, 11, 15 and 19 kb/s, is lower). Measured here (or105/or109
#: speech at 8 kHz, FEC for 10 %, PESQ NB): at complexity 5, automatic (8.5 kb/s) scores
#: 4.15, 24 kb/s (20 kb/s VBR) 4.25-4.39, the old 48 kHz path (38 kb/s) 4.45. At 8 kHz the
#: floor is 32 kb/s (26-27 kb/s VBR): with it complexity 1 (AUTO_COMPLEXITY) scores 4.28-4.41,
#: no worse than complexity 5 at 24 kb/s, for half the encoder's CPU (bench/README.md,
#: "twelfth measurement").
AUTO_MIN_BITRATE = {8000: 32000, 12000: 24000, 16000: 24000}
#: OPUS_SET_COMPLEXITY of an encoder configured `auto` (the Argon endpoints' default), by input
#: rate; AUTO_COMPLEXITY_DEFAULT at the rates not listed. At 8 kHz input (a phone call),
#: complexity 1 with AUTO_MIN_BITRATE's 32 kb/s codes speech as well as complexity 5 at 24
#: kb/s did, SILK with FEC or CELT alike, at every loss rate measured (0-20 %), in 38 µs per
#: 20 ms frame against 82 µs (SILK with FEC; CELT: 37 against 57). At 16 kHz complexity 1
#: lost 0.25 PESQ WB even at 32 kb/s, so wider input keeps 5.
AUTO_COMPLEXITY = {8000: 1}
AUTO_COMPLEXITY_DEFAULT = 5
FEC_PACKET_LOSS_PERC = 10  # default expected loss (%) told to the encoder when FEC is on
SILENCE_FRAME = b"\xff\xfe"  # a CELT frame that decodes to digital silence (the "F8 FF FE" packet's payload)
APPLICATIONS = {
    "audio": opuslib.APPLICATION_AUDIO,
    "voip": opuslib.APPLICATION_VOIP,
    "restricted_lowdelay": opuslib.APPLICATION_RESTRICTED_LOWDELAY,
}

_lib = opuslib.api.libopus
# Private function objects (CDLL[name] makes a new one), so our argtypes do not touch opuslib's.
_encode = _lib["opus_encode"]
_encode.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int32)
_encode.restype = ctypes.c_int32
_decode = _lib["opus_decode"]
_decode.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
_decode.restype = ctypes.c_int
_packet_parse = _lib["opus_packet_parse"]  # validates the framing (RFC 6716 §3.2); NULL outputs allowed
_packet_parse.argtypes = (ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_packet_parse.restype = ctypes.c_int
_packet_get_samples_per_frame = _lib["opus_packet_get_samples_per_frame"]
_packet_get_samples_per_frame.argtypes = (ctypes.c_char_p, ctypes.c_int32)
_packet_get_samples_per_frame.restype = ctypes.c_int
MAX_FRAMES_PER_PACKET = 48  # RFC 6716 §3.2.5: at most 48 frames (120 ms of 2.5 ms frames)
_packet_get_nb_channels = _lib["opus_packet_get_nb_channels"]
_packet_get_nb_channels.argtypes = (ctypes.c_char_p,)
_packet_get_nb_channels.restype = ctypes.c_int
_packet_get_bandwidth = _lib["opus_packet_get_bandwidth"]
_packet_get_bandwidth.argtypes = (ctypes.c_char_p,)
_packet_get_bandwidth.restype = ctypes.c_int
_strerror = _lib["opus_strerror"]
_strerror.argtypes = (ctypes.c_int,)
_strerror.restype = ctypes.c_char_p


def auto_complexity(input_rate: int) -> int:
    """The OPUS_SET_COMPLEXITY (0-10) of an encoder configured `auto` at `input_rate` Hz:
    AUTO_COMPLEXITY, or AUTO_COMPLEXITY_DEFAULT at a rate it does not list."""
    return AUTO_COMPLEXITY.get(input_rate, AUTO_COMPLEXITY_DEFAULT)


def opus_strerror(code: int) -> str:
    """libopus's text for a negative error code ("corrupted stream", "invalid argument", ...)."""
    text: bytes = _strerror(code)
    return text.decode("ascii", "replace")


def _invalid(packet: bytes, cause: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid Opus packet ({len(packet)} bytes): {cause}", close_code=CloseCode.INVALID_PAYLOAD)


def packet_samples(packet: bytes) -> int:
    """Duration of one Opus packet in samples per channel at 48 kHz: frames x samples per
    frame from the TOC byte (RFC 6716 §3.1). The framing (code 0-3 frame lengths, padding,
    the 120 ms limit, §3.2) is checked without decoding; raises RemoteProtocolError (close
    code 1007) for an empty or malformed packet."""
    if not packet:
        raise _invalid(packet, "empty (RFC 6716 §3.1: at least the TOC byte)")
    sizes = (ctypes.c_int16 * MAX_FRAMES_PER_PACKET)()
    frames: int = _packet_parse(packet, len(packet), None, None, ctypes.addressof(sizes), None)
    if frames < 0:
        raise _invalid(packet, opus_strerror(frames))
    per_frame: int = _packet_get_samples_per_frame(packet, OPUS_RATE)
    return frames * per_frame


def packet_frame_samples(packet: bytes) -> int:
    """Samples at 48 kHz of each frame of an Opus packet (120 to 2880, from the TOC config,
    RFC 6716 §3.1); 0 for an empty packet. The framing is not checked."""
    return _packet_get_samples_per_frame(packet, OPUS_RATE) if packet else 0


def packet_channels(packet: bytes) -> int:
    """Channels coded in an Opus packet (1 or 2, the TOC's s bit, RFC 6716 §3.1).
    Raises RemoteProtocolError (1007) for an empty packet."""
    if not packet:
        raise _invalid(packet, "empty (RFC 6716 §3.1: at least the TOC byte)")
    channels: int = _packet_get_nb_channels(packet)
    return channels


#: Audio bandwidth (Hz) of each OPUS_BANDWIDTH_* a TOC byte names (RFC 6716 §2, Table 1).
BANDWIDTH_HZ = {
    opuslib.BANDWIDTH_NARROWBAND: 4000,
    opuslib.BANDWIDTH_MEDIUMBAND: 6000,
    opuslib.BANDWIDTH_WIDEBAND: 8000,
    opuslib.BANDWIDTH_SUPERWIDEBAND: 12000,
    opuslib.BANDWIDTH_FULLBAND: 20000,
}


def packet_bandwidth(packet: bytes) -> int:
    """Audio bandwidth in Hz an Opus packet codes, from its TOC config (RFC 6716 §3.1): 4000
    (narrowband), 6000 (mediumband), 8000 (wideband), 12000 (super-wideband) or 20000
    (fullband). Raises RemoteProtocolError (1007) for an empty packet."""
    if not packet:
        raise _invalid(packet, "empty (RFC 6716 §3.1: at least the TOC byte)")
    return BANDWIDTH_HZ[_packet_get_bandwidth(packet)]


_lbrr_sizes = (ctypes.c_int16 * MAX_FRAMES_PER_PACKET)()  # scratch outputs of packet_has_lbrr (one trio thread)
_lbrr_offset = ctypes.c_int(0)


def packet_has_lbrr(packet: bytes) -> bool:
    """Whether an Opus packet carries in-band FEC (LBRR) data, i.e. a low-bitrate copy of the
    audio of the packet before it, which `OpusDecoder.conceal(samples, packet)` decodes
    (decode_fec=1) when that packet was lost.

    Only SILK and hybrid packets (TOC configs 0-15) can. The SILK layer starts with one VAD
    flag per 20 ms SILK frame (1-3) and then the LBRR flag, each a bit of probability 1/2, so
    they are the top bits of the first frame's first byte; a stereo packet repeats them for
    the side channel (RFC 6716 §4.2.3, "Header Bits"; libopus 1.5 `opus_packet_has_lbrr`, not
    in the libopus 1.3 this runs on). False for a CELT-only, empty or malformed packet, and
    for an empty first frame (DTX); never raises."""
    if not packet or packet[0] >= 0x80:
        return False
    frames = _packet_parse(packet, len(packet), None, None, ctypes.addressof(_lbrr_sizes), ctypes.addressof(_lbrr_offset))
    if frames <= 0 or _lbrr_sizes[0] <= 0:
        return False
    per_frame = _packet_get_samples_per_frame(packet, OPUS_RATE)
    silk_frames = per_frame // 960 if per_frame > 960 else 1  # 20 ms SILK frames in one Opus frame
    header = packet[_lbrr_offset.value]
    if header >> (7 - silk_frames) & 1:
        return True
    return bool(packet[0] & 0x04) and bool(header >> (6 - 2 * silk_frames) & 1)


@functools.lru_cache(maxsize=32)
def silence_packet(samples: int, channels: int = 1) -> bytes:
    """An Opus packet of `samples` per channel at 48 kHz (a multiple of 2.5 ms up to 120 ms)
    that decodes to digital silence: CELT-only fullband frames of FF FE, one frame with code 0
    or several of 20 ms (else 10, 5, 2.5 ms) with code 3, CBR (RFC 6716 §3.1, §3.2.5). For 20
    ms mono it is F8 FF FE, the packet Argon's reference bot sends in place of one it cannot
    send (shared/protocols/argon-voice-ws.md, "What the reference bot does"). Raises
    ValueError for another duration or channel count."""
    if channels not in (1, 2):
        raise ValueError(f"Opus channels must be 1 or 2, got {channels}")
    for frame, config in ((960, 31), (480, 30), (240, 29), (PLC_GRANULE, 28)):
        if samples > 0 and samples % frame == 0 and samples <= MAX_FRAME_SAMPLES:
            count = samples // frame
            break
    else:
        raise ValueError(f"an Opus packet lasts a multiple of {PLC_GRANULE} samples up to {MAX_FRAME_SAMPLES}, not {samples}")
    toc = config << 3 | (0x04 if channels == 2 else 0)
    if count == 1:
        return bytes([toc]) + SILENCE_FRAME
    return bytes([toc | 3, count]) + SILENCE_FRAME * count


def _opus_format(channels: int) -> AudioFormat:
    if channels == 1:
        return OPUS_48K
    if channels == 2:
        return OPUS_48K_STEREO
    raise ValueError(f"Opus channels must be 1 or 2, got {channels}")


@attrs.define(eq=False)
class OpusEncoder:
    """PCM16 `AudioFrame` at `input_rate` (8, 12, 16, 24 or 48 kHz) -> one Opus packet per
    frame (`EncodedFrame`, OPUS_48K or OPUS_48K_STEREO, whatever the input rate).

    Each input frame must hold exactly `ptime_ms` of audio (input_rate * ptime_ms / 1000
    samples); with `ptime_ms=None` any Opus frame size is taken (2.5, 5, 10, 20, 40, 60, 80,
    100 or 120 ms). Other sizes, rates or channel counts raise LocalProtocolError. The packets
    decode at 48 kHz like any other, so the output side is in 48 kHz units: an EncodedFrame's
    `samples` and `timestamp` are the input's times 48000 / input_rate, and `delay` too.

    A lower input rate codes only the band it carries (OPUS_SET_MAX_BANDWIDTH from
    OPUS_MAX_BANDWIDTH: 8 kHz input makes narrowband packets, 48 kHz fullband), and feeding an
    8 kHz call straight in removes the 8 -> 48 kHz Resampler (and its 4.5 ms) from the chain.
    What it saves depends on the mode libopus picks. Measured here (bench/bench_codecs.py
    `opus_by_input_rate`: or105 speech, 20 ms mono, complexity 5, a loaded 2-core machine, so
    ranges of 3 runs), µs per frame at 8 / 12 / 16 / 24 / 48 kHz input:
    - SILK (FEC for 10 %, no bitrate set: what an Argon bot publishes): 118-137 / 133-173 /
      197-234 / 208-290 / 213-284 (hybrid), at 20 / 19 / 18 / 21 / 38 kb/s;
    - 'voip' at 24 kb/s: 96-126 / 146-156 / 167-200 / 198-234 / 215-262;
    - CELT ('audio' at 24 kb/s, no FEC): 57-84 at every rate (CELT works at 48 kHz inside).
    The issue's opuslib figure on ITU speech: 55 against 163 µs (8 against 48 kHz) for a PESQ
    NB within 0.01-0.13 of the 48 kHz path at half the bitrate.

    DTX is off unless asked for: with DTX the encoder sends 1-byte packets (the TOC alone) in
    silence, which end an Argon publishing session; without it digital silence still codes to >= 3 bytes (CELT) or
    ~20-36 bytes (hybrid, with FEC). `min_packet_bytes` replaces any shorter packet by
    `silence_packet` of the same duration, whatever the settings. `delay` is the encoder
    lookahead in samples at 48 kHz (OPUS_GET_LOOKAHEAD at the input rate, scaled: 312 = 6.5
    ms for 'audio' and 'voip', 120 = 2.5 ms for 'restricted_lowdelay', at every input rate),
    so `Chain.delay_ms` (delay / output.rate) stays right.

    In-band FEC (`fec`) only exists in SILK and hybrid packets. libopus 1.3 leaves CELT for
    hybrid (SILK alone at 8-16 kHz input) when FEC is on and the expected loss exceeds (128 - voice estimate) / 16 %: for
    'audio' below complexity 7 (no signal analysis, estimate 48) that is from 6 % on; at 5 % or
    less no packet carries FEC, whatever `fec` says. Then each packet of active speech carries
    a low-bitrate copy of the frame before it (`packet_has_lbrr`). Measured here (speech, 20
    ms mono, complexity 5, 10 %): the encoder costs ~230 µs per frame instead of ~110, ~98 %
    of the packets of speech carry LBRR, ~38 kb/s on average instead of ~51 (VBR), and the
    hybrid decoder's delay is 310 samples instead of CELT's 312.
    """

    channels: int
    """1 or 2."""
    ptime_ms: int | None
    """Frame duration in ms (one of OPUS_PTIMES_MS), or None for any valid Opus size."""
    application: str = attrs.field(default="audio", kw_only=True)
    """'audio', 'voip' or 'restricted_lowdelay' (OPUS_APPLICATION_*)."""
    bitrate: int | None = attrs.field(default=None, kw_only=True)
    """Target bits per second (500-512000); None keeps libopus's automatic choice, which
    scales with the input rate (60 x packets per second + input_rate x channels: ~51 kb/s
    for 48 kHz mono in 20 ms, ~11 kb/s for 8 kHz), except that at 8, 12 and 16 kHz input it
    is raised to AUTO_MIN_BITRATE per channel (32 kb/s at 8 kHz, 24 at 12 and 16;
    `target_bitrate`)."""
    dtx: bool = attrs.field(default=False, kw_only=True)
    """Discontinuous transmission (OPUS_SET_DTX)."""
    fec: bool = attrs.field(default=False, kw_only=True)
    """In-band FEC (OPUS_SET_INBAND_FEC), tuned for `expected_loss_pct`."""
    expected_loss_pct: int = attrs.field(default=FEC_PACKET_LOSS_PERC, kw_only=True)
    """Packet loss (0-100 %) the encoder is told to expect when `fec` is on
    (OPUS_SET_PACKET_LOSS_PERC): more loss, more bits for the FEC copy and less prediction
    across packets; ignored (0) when `fec` is off."""
    min_packet_bytes: int = attrs.field(default=0, kw_only=True)
    """Packets shorter than this (DTX: 1 byte) are replaced by `silence_packet` of the same
    duration; counted in `filled`. 0: packets go as libopus makes them."""
    filled: int = attrs.field(default=0, init=False)
    """Packets replaced because of `min_packet_bytes`."""
    input_rate: int = attrs.field(default=OPUS_RATE, kw_only=True)
    """Sample rate of the PCM input, Hz: one of OPUS_INPUT_RATES (opuslib.Encoder(fs, ...))."""
    complexity: int | Literal["auto"] | None = attrs.field(default=None, kw_only=True)
    """0-10 (OPUS_SET_COMPLEXITY); None keeps libopus's default (10); "auto" is
    `auto_complexity(input_rate)` (1 at 8 kHz, 5 above), and reads as that number once the
    encoder is made. Measured here on speech: ~250 µs per 20 ms mono frame at 10, ~56 µs at 5,
    for a small loss of quality."""
    input: AudioFormat = attrs.field(init=False)
    output: AudioFormat = attrs.field(init=False)
    delay: int = attrs.field(init=False)
    _scale: int = attrs.field(init=False)
    """48000 / input_rate: input samples -> 48 kHz samples."""
    _lookahead: int = attrs.field(init=False)
    """OPUS_GET_LOOKAHEAD, in samples at the input rate."""
    _frame_sizes: frozenset[int] = attrs.field(init=False)
    _enc: opuslib.Encoder = attrs.field(init=False)
    _pcm: np.ndarray = attrs.field(init=False)
    _pcm_addr: int = attrs.field(init=False)
    _out: ctypes.Array[ctypes.c_char] = attrs.field(init=False)
    _last_ts: int | None = attrs.field(default=None, init=False)
    _last_samples: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.output = _opus_format(self.channels)
        if self.input_rate not in OPUS_INPUT_RATES:
            raise ValueError(f"Opus input rate must be one of {', '.join(map(str, OPUS_INPUT_RATES))} Hz, "
                             f"got {self.input_rate}")
        self.input = AudioFormat(Encoding.PCM16, self.input_rate, self.channels)
        if self.complexity == "auto":
            self.complexity = auto_complexity(self.input_rate)
        self._scale = OPUS_RATE // self.input_rate
        self._frame_sizes = frozenset(n // self._scale for n in OPUS_FRAME_SAMPLES)
        if self.ptime_ms is not None and self.ptime_ms not in OPUS_PTIMES_MS:
            raise ValueError(f"Opus ptime must be one of {OPUS_PTIMES_MS} ms, got {self.ptime_ms}")
        if self.application not in APPLICATIONS:
            raise ValueError(f"Opus application must be one of {sorted(APPLICATIONS)}, got {self.application!r}")
        self._enc = opuslib.Encoder(self.input_rate, self.channels, APPLICATIONS[self.application])
        self._configure()
        self._lookahead = self._enc.lookahead
        self.delay = self._lookahead * self._scale
        self._pcm = np.zeros((MAX_FRAME_SAMPLES, self.channels), dtype=np.int16)
        self._pcm_addr = self._pcm.ctypes.data  # stays valid: self._pcm owns the memory
        self._out = ctypes.create_string_buffer(MAX_PACKET_BYTES)

    def _configure(self) -> None:
        state, ctl = self._enc.encoder_state, opuslib.api.ctl
        set_ = opuslib.api.encoder.encoder_ctl
        try:
            if self.target_bitrate is not None:
                set_(state, ctl.set_bitrate, self.target_bitrate)
            complexity = self.complexity  # "auto" was resolved in __attrs_post_init__
            if complexity is not None:
                if not isinstance(complexity, int) or not 0 <= complexity <= 10:
                    raise ValueError(f"Opus complexity must be 0-10 or 'auto', got {complexity!r}")
                set_(state, ctl.set_complexity, complexity)
            set_(state, ctl.set_max_bandwidth, OPUS_MAX_BANDWIDTH[self.input_rate])
            set_(state, ctl.set_dtx, int(self.dtx))
            set_(state, ctl.set_inband_fec, int(self.fec))
            if not 0 <= self.expected_loss_pct <= 100:
                raise ValueError(f"Opus expected loss must be 0-100 %, got {self.expected_loss_pct}")
            set_(state, ctl.set_packet_loss_perc, self.expected_loss_pct if self.fec else 0)
        except opuslib.OpusError as exc:
            raise ValueError(f"Opus encoder rejected the settings (bitrate={self.bitrate}): {exc}") from None

    @property
    def target_bitrate(self) -> int | None:
        """The bitrate asked of libopus (OPUS_SET_BITRATE): `bitrate`, or for None at an
        input rate of 16 kHz or less AUTO_MIN_BITRATE[input_rate] per channel; None:
        libopus's own."""
        if self.bitrate is None and self.input_rate in AUTO_MIN_BITRATE:
            return AUTO_MIN_BITRATE[self.input_rate] * self.channels
        return self.bitrate

    @property
    def frame_samples(self) -> int | None:
        """Samples per channel each input frame must have (None: any Opus frame size)."""
        return None if self.ptime_ms is None else self.ptime_ms * self.input_rate // 1000

    def process(self, frame: Frame) -> list[EncodedFrame]:
        frame = check_pcm(frame, self.input, "OpusEncoder")
        n = frame.pcm.shape[0]
        expected = self.frame_samples
        if (n != expected) if expected is not None else (n not in self._frame_sizes):
            want = f"{expected} samples ({self.ptime_ms} ms)" if expected else "an Opus frame size"
            raise LocalProtocolError(f"OpusEncoder takes frames of {want}, got {n} samples")
        self._last_ts, self._last_samples = frame.timestamp, n
        scale = self._scale
        return [EncodedFrame(self._encode(frame.pcm, n), self.output, n * scale, frame.timestamp * scale)]

    def _encode(self, pcm: np.ndarray, n: int) -> bytes:
        buf = self._pcm
        buf[:n] = pcm
        size = _encode(self._enc.encoder_state, self._pcm_addr, n, self._out, MAX_PACKET_BYTES)
        if size < 0:
            raise LocalProtocolError(f"opus_encode failed: {opus_strerror(size)}")
        if size < self.min_packet_bytes:
            self.filled += 1
            return silence_packet(n * self._scale, self.channels)
        return ctypes.string_at(self._out, size)

    def flush(self) -> list[EncodedFrame]:
        """Encode silence until the lookahead's worth of the last input is out (one packet of
        the last frame size for ptimes >= 10 ms), then reset the encoder for a new stream."""
        if self._last_ts is None:
            return []
        n, scale = self._last_samples, self._scale
        ts = (self._last_ts + n) * scale
        frames: list[EncodedFrame] = []
        silence = np.zeros((n, self.channels), dtype=np.int16)
        for _ in range(-(-self._lookahead // n)):
            frames.append(EncodedFrame(self._encode(silence, n), self.output, n * scale, ts))
            ts += n * scale
        opuslib.api.encoder.encoder_ctl(self._enc.encoder_state, opuslib.api.ctl.reset_state)
        self._last_ts = None
        return frames


@attrs.define(eq=False)
class OpusDecoder:
    """One Opus packet per `EncodedFrame` -> PCM16 48 kHz `AudioFrame` of `channels`.

    Decodes any valid packet (2.5 to 120 ms, mono or stereo coded; libopus up- or down-mixes to
    `channels`); the frame has the packet's real duration. A malformed packet raises
    RemoteProtocolError with close code 1007 naming libopus's reason; a frame of another
    encoding raises LocalProtocolError. `conceal` fills a gap (PLC, or FEC from the next
    packet). No delay of its own: the codec delay is the encoder's lookahead.
    """

    channels: int
    """Output channels, 1 or 2."""
    input: AudioFormat = attrs.field(init=False)
    output: AudioFormat = attrs.field(init=False)
    delay: int = attrs.field(default=0, init=False)
    _dec: opuslib.Decoder = attrs.field(init=False)
    _pcm: np.ndarray = attrs.field(init=False)
    _pcm_addr: int = attrs.field(init=False)
    _next_ts: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.input = _opus_format(self.channels)
        self.output = self.input.as_pcm()
        self._dec = opuslib.Decoder(OPUS_RATE, self.channels)
        self._pcm = np.zeros((MAX_FRAME_SAMPLES, self.channels), dtype=np.int16)
        self._pcm_addr = self._pcm.ctypes.data

    @property
    def next_timestamp(self) -> int:
        """Timestamp just after the last decoded or concealed sample."""
        return self._next_ts

    def process(self, frame: Frame) -> list[AudioFrame]:
        frame = check_encoded(frame, Encoding.OPUS, "OpusDecoder")
        packet = frame.payload
        if not packet:
            raise _invalid(packet, "empty (RFC 6716 §3.1: at least the TOC byte)")
        return [self._decode(packet, MAX_FRAME_SAMPLES, False, frame.timestamp)]

    def _decode(self, packet: bytes | None, frame_size: int, fec: bool, timestamp: int) -> AudioFrame:
        size = len(packet) if packet else 0
        n = _decode(self._dec.decoder_state, packet, size, self._pcm_addr, frame_size, int(fec))
        if n < 0:
            if packet is None:
                raise LocalProtocolError(f"Opus PLC of {frame_size} samples failed: {opus_strerror(n)}")
            raise _invalid(packet, opus_strerror(n))
        self._next_ts = timestamp + n
        return AudioFrame(self._pcm[:n].copy(), OPUS_RATE, timestamp)

    def conceal(self, samples: int, next_packet: bytes | None = None) -> AudioFrame:
        """Audio for `samples` lost samples (a multiple of 120 = 2.5 ms, at most 5760).

        Without `next_packet`, libopus's packet loss concealment (opus_decode with no data,
        RFC 6716 §4.4); with the packet that follows the gap, its in-band FEC data when it
        has some (decode_fec=1), else PLC. The frame is stamped `next_timestamp`. Raises
        LocalProtocolError for a bad size, RemoteProtocolError for a malformed next_packet.
        """
        if samples <= 0 or samples % PLC_GRANULE or samples > MAX_FRAME_SAMPLES:
            raise LocalProtocolError(f"Opus can conceal a multiple of {PLC_GRANULE} samples up to {MAX_FRAME_SAMPLES}, not {samples}")
        if next_packet is not None and not next_packet:
            raise _invalid(next_packet, "empty (RFC 6716 §3.1: at least the TOC byte)")
        return self._decode(next_packet, samples, next_packet is not None, self._next_ts)

    def flush(self) -> list[AudioFrame]:
        """Nothing is held back; resets the decoder state for a new stream."""
        opuslib.api.decoder.decoder_ctl(self._dec.decoder_state, opuslib.api.ctl.reset_state)
        return []
