"""Opus loss concealment and in-band FEC on the Argon paths (issue 11, "Concealment instead of
silence"): libopus PLC for gaps in arrival, FEC from the next packet when it carries LBRR, a
fade to silence in long gaps, no click at the join; the Argon dial's encoder with FEC and never
a packet the Argon server ends the session for; and, through a running gateway on loopback,
packets a bot withholds concealed in what the other side records.

Real libopus, real speech (gateway/assets, 8 kHz recordings brought to 48 kHz with soxr).
The pure parts run without an event loop, on explicit arrival times (tests/test_playout.py's
`simulate`); the gateway runs are real time and check only what load cannot change.
"""

from __future__ import annotations

import math
import wave
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx
import numpy as np
import pytest
import soxr
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

from audio_checks import (
    STALL_REACH_S,
    assert_blocks_found,
    best_alignment,
    blockwise_alignment,
    blockwise_blocks,
    read_wav,
    write_wav,
)
from gateway.adapters.argon import dial as dial_module, room as room_module
from gateway.adapters.argon.dial import ArgonDial
from gateway.adapters.argon.room import MAX_PACKET, BotSession
from gateway.codecs import AudioFrame, EncodedFrame, OpusDecoder, OpusEncoder, packet_samples, plan
from gateway.codecs.formats import OPUS_48K, OPUS_48K_STEREO, PCM16_48K, PCM16_48K_STEREO
from gateway.codecs.opus import packet_has_lbrr, silence_packet
from gateway.codecs.playout import (
    FADE_END_MS,
    IDLE_AFTER_MS,
    PLC_FULL_MS,
    OpusPlayout,
    PlayoutStats,
)
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.endpoint import EndpointStats
from gateway.errors import ConfigError
from harness import BOT_TOKEN, start as start_gateway
from test_playout import T0, paced, pcm_of, simulate

ASSETS = Path(__file__).resolve().parent.parent / "gateway" / "assets"
RATE = 48000
N = 960  # samples of one 20 ms packet
SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
#: What the Argon dial publishes with (its defaults: complexity auto, 5 at 48 kHz input; FEC tuned for 10 % loss, no
#: packet under 3 bytes), read from the endpoint itself.
ARGON = ArgonDial("probe", api_url="http://127.0.0.1:9", bot_token="t", space_id=SPACE, channel_id=CHANNEL).encoder_options


def read48k(name: str) -> np.ndarray:
    with wave.open(str(ASSETS / name)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        rate = w.getframerate()
    y = soxr.resample(pcm.astype(np.float32), rate, RATE, quality="VHQ")
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16).reshape(-1, 1)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """~16 s of speech with its pauses (or105 + or109), 48 kHz, int16 (n, 1)."""
    return np.concatenate([read48k("or105.wav"), read48k("or109.wav")])


def encode(pcm: np.ndarray, ptime: int = 20, **options) -> tuple[list[bytes], int]:
    """Opus packets of `pcm` through the chain a sink with `options` gets (plan()), and the
    codec delay in samples."""
    channels = pcm.shape[1]
    chain = plan(PCM16_48K_STEREO if channels == 2 else PCM16_48K, OPUS_48K_STEREO if channels == 2 else OPUS_48K,
                 ptime_ms=ptime, **options)
    n = 48 * ptime
    packets = [f.payload for i in range(0, len(pcm) - n + 1, n)
               for f in chain.process(AudioFrame(np.ascontiguousarray(pcm[i : i + n]), RATE, i))]
    return packets, chain.delay


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


BAND_EDGES = np.geomspace(100, 4000, 17)  # 16 bands over the speech band of the 8 kHz recordings


def spectral_distance(original: np.ndarray, filled: np.ndarray) -> float:
    """Log-spectral distance (dB, RMS over 16 bands of 100-4000 Hz) of `filled` from
    `original`, band energies floored 60 dB below the original's loudest band: 0 for the same
    spectrum, >= ~37 dB for silence in place of speech."""

    def bands(y: np.ndarray) -> np.ndarray:
        spectrum = np.abs(np.fft.rfft(y.astype(np.float64) * np.hanning(len(y)))) ** 2
        f = np.fft.rfftfreq(len(y), 1 / RATE)
        return np.array([spectrum[(f >= lo) & (f < hi)].sum() for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:])])

    a, b = bands(original), bands(filled)
    floor = a.max() * 1e-6
    return float(np.sqrt(np.mean((10 * np.log10(np.maximum(a, floor) / np.maximum(b, floor))) ** 2)))


def loud_frames(pcm: np.ndarray, packets: list[bytes], delay: int, level: float = 1000) -> list[int]:
    """Indexes of 20 ms packets that code speech (RMS above `level`), away from the edges."""
    return [k for k in range(5, len(packets) - 5) if rms(pcm[k * N - delay : (k + 1) * N - delay]) > level]


# --- PLC and FEC, frame by frame --------------------------------------------------------------


@pytest.fixture(scope="module")
def lost_frames(speech):
    """Every 4th packet of speech lost (Argon encoder defaults): per lost frame, the spectral
    distance from the original of PLC, of FEC from the next packet, and of silence."""
    packets, delay = encode(speech, **ARGON)
    lost = set(loud_frames(speech, packets, delay)[::4])
    plc_dec, fec_dec = OpusDecoder(1), OpusDecoder(1)
    rows = []
    for k, packet in enumerate(packets[:-1]):
        if k in lost:
            original = speech[k * N - delay : (k + 1) * N - delay, 0]
            plc = plc_dec.conceal(N).pcm[:, 0]
            fec = fec_dec.conceal(N, packets[k + 1]).pcm[:, 0]
            rows.append((spectral_distance(original, plc), spectral_distance(original, fec),
                         spectral_distance(original, np.zeros(N)), packet_has_lbrr(packets[k + 1])))
        else:
            plc_dec.process(EncodedFrame(packet, OPUS_48K, N))
            fec_dec.process(EncodedFrame(packet, OPUS_48K, N))
    return np.array(rows)


def test_plc_fills_each_lost_frame_closer_to_the_original_than_silence(lost_frames):
    plc, _, silence, _ = lost_frames.T
    assert len(plc) >= 20
    assert (plc < silence).all(), np.round(np.c_[plc, silence], 1)  # every lost frame
    assert silence.min() > 30 and np.mean(plc) < 15  # measured: silence >= 37 dB, PLC ~10 dB


def test_fec_rebuilds_each_lost_frame_closer_still(lost_frames):
    """The Argon encoder's defaults put LBRR in the packets of speech; decoded from the next
    packet, a lost frame comes out far closer than PLC makes it."""
    plc, fec, _, lbrr = lost_frames.T
    assert lbrr.mean() > 0.9  # measured ~98 % of packets of speech
    assert np.mean(fec) < 0.5 * np.mean(plc)  # measured ~2 dB against ~10 dB
    assert np.mean(fec < plc) > 0.9


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("ptime", [10, 20, 40, 60])
def test_packet_has_lbrr_says_when_libopus_decodes_fec(speech, ptime, channels):
    """Where `packet_has_lbrr` says no, decoding FEC from that packet is the very PLC (so it is
    not counted as a recovery); where it says yes, libopus really decodes something else."""
    pcm = np.repeat(speech[: 6 * RATE], channels, axis=1)
    for fec in (False, True):
        packets, _ = encode(pcm, ptime, opus_complexity=5, opus_fec=fec, opus_bitrate=24000 * channels)
        flags = [packet_has_lbrr(p) for p in packets]
        assert any(flags) == fec
        for k in range(5, len(packets) - 1, 5):
            with_fec, plain = OpusDecoder(channels), OpusDecoder(channels)
            for p in packets[k - 5 : k]:
                with_fec.process(EncodedFrame(p, OPUS_48K, 0))
                plain.process(EncodedFrame(p, OPUS_48K, 0))
            n = packet_samples(packets[k])
            same = np.array_equal(with_fec.conceal(n, packets[k + 1]).pcm, plain.conceal(n).pcm)
            assert same != flags[k + 1], (k, flags[k + 1])
    assert not packet_has_lbrr(b"") and not packet_has_lbrr(b"\xf8\xff\xfe") and not packet_has_lbrr(b"\x03")


# --- through the playout: FEC in time, the join, the long gap ----------------------------------


def spaced_losses(speech, packets, delay, every: int = 50) -> list[int]:
    lost: list[int] = []
    for k in loud_frames(speech, packets, delay, 1500):
        if not lost or k - lost[-1] >= every:
            lost.append(k)
    return lost


def slot_in(y: np.ndarray, source: np.ndarray, k: int, delay: int) -> np.ndarray:
    """The output of slot k in the playout's output `y`: the playout grows its delay with PLC
    in pauses, so the output is found where the source around the slot aligns (within 25 ms)."""
    context = source[(k - 3) * N - delay : (k + 4) * N - delay, 0]
    lo = (k - 3) * N - 1200
    _, lag = best_alignment(context, RATE, y[lo : (k + 4) * N + 1200], RATE, max_lag_s=0.05)
    at = lo + int(round(lag * RATE)) + 3 * N
    return y[at : at + N]


@pytest.mark.parametrize("seed", [1, 2])
def test_playout_rebuilds_later_losses_from_fec_after_one_came_too_late(speech, seed):
    """Packets ~1 s apart are lost from a paced stream with up to 1 ms of jitter. At the 20 ms
    floor the packet after the first loss comes just after the lost slot's deadline (PLC,
    counted `fec_missed`); the target then covers one packet more, grown in a pause, and every
    later loss is rebuilt from the next packet's FEC, at ~5 ms more latency. A sender without
    FEC changes nothing."""
    rng = np.random.default_rng(seed)
    results = {}
    for fec in (True, False):
        packets, delay = encode(speech, **{**ARGON, "opus_fec": fec})
        lost = spaced_losses(speech, packets, delay)
        arrivals = [(T0 + k * 0.020 + (rng.uniform(0, 0.001) if k else 0.0), p)
                    for k, p in enumerate(packets) if k not in lost]
        playout = OpusPlayout(1)
        delays: list[float] = []
        out = simulate(playout, arrivals, probe=lambda pl, now: delays.append(pl.stats.delay_ms))
        results[fec] = (playout.stats, lost, max(delays), out, delay)
    st, lost, most, out, delay = results[True]
    assert len(lost) >= 6
    assert st.fec_missed == 1 and st.fec == len(lost) - 1 and st.late == 0
    assert most < 20 + 20 + 10  # one packet more than the floor, and the margin
    y = pcm_of(out)[:, 0]
    later = [spectral_distance(speech[k * N - delay : (k + 1) * N - delay, 0], slot_in(y, speech, k, delay)) for k in lost[1:]]
    assert np.mean(later) < 6, np.round(later, 1)  # FEC-close (PLC: ~10 dB)
    plain = results[False][0]
    assert plain.fec == plain.fec_missed == 0 and results[False][2] < 25


def high_band_db(x: np.ndarray) -> float:
    """Energy above 5 kHz (dB, per sample): the 8 kHz recordings have none, so a click shows."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x)))) ** 2
    return 10 * math.log10(spectrum[np.fft.rfftfreq(len(x), 1 / RATE) > 5000].sum() / len(x) + 1e-9)


def test_the_next_packet_joins_the_concealment_without_a_click(speech):
    """Three packets lost in speech: where the first packet after them starts, the energy
    above 5 kHz is about what the loss-free stream has at that place (the decoder ran PLC, so
    its state continues into the packet; measured +0 to +6 dB). With silence fill the same
    joins click: +12 to +60 dB."""
    packets, delay = encode(speech, **ARGON)
    reference = pcm_of(simulate(OpusPlayout(1), paced(packets)))[:, 0]
    loud = loud_frames(speech, packets, delay, 1500)
    joins = [k for k in loud if k + 3 in loud][::3][:8]
    excess = {}
    for concealment in (True, False):
        excess[concealment] = []
        for k in joins:
            arrivals = [a for i, a in enumerate(paced(packets)) if i not in (k, k + 1, k + 2)]
            y = pcm_of(simulate(OpusPlayout(1, concealment=concealment), arrivals))[:, 0]
            j = (k + 3) * N  # the timeline is whole: the join is where the packet belongs
            excess[concealment].append(high_band_db(y[j - 120 : j + 120]) - high_band_db(reference[j - 120 : j + 120]))
    assert len(joins) >= 5
    assert max(excess[True]) < 10, np.round(excess[True], 1)
    assert np.median(excess[False]) > 20, np.round(excess[False], 1)


def test_a_long_gap_fades_to_silence_and_libopus_alone_would_not(speech):
    """The sender stops for 600 ms in the middle of speech: PLC at full level first, faded to
    digital silence by FADE_END_MS, idle at IDLE_AFTER_MS (the route's silence from there),
    and the speech that follows starts on a new anchor, its timestamps continuing. libopus's
    own PLC (measured: after CELT packets -20 dB at 200 ms, never silent) is why the fade is
    ours."""
    packets, delay = encode(speech, opus_complexity=5)  # CELT: what libopus 1.3 makes of speech without FEC
    k = next(i for i in loud_frames(speech, packets, delay, 1500) if i > 50)
    stop, resume = k, k + 30
    arrivals = [a for i, a in enumerate(paced(packets[: resume + 50])) if not stop <= i < resume]
    out = simulate(OpusPlayout(1), arrivals)
    last = next(i for i, (t, f) in enumerate(out) if f.timestamp >= stop * N)
    levels = [rms(f.pcm) for _, f in out[last : last + 10]]
    before = rms(out[last - 1][1].pcm)
    assert all(lvl > 0.05 * before for lvl in levels[: PLC_FULL_MS // 20 - 1]), np.round(levels)
    tail = [f for _, f in out[last:] if stop * N + FADE_END_MS * 48 <= f.timestamp < stop * N + IDLE_AFTER_MS * 48]
    assert len(tail) == (IDLE_AFTER_MS - FADE_END_MS) // 20 and all(not f.pcm.any() for f in tail)
    # idle: nothing emitted from IDLE_AFTER_MS until the next packet, then it continues
    times = [t for t, _ in out]
    gap = max(b - a for a, b in zip(times, times[1:]))
    assert gap >= (resume - stop) * 0.020 - IDLE_AFTER_MS / 1000 - 0.021
    for (_, a), (_, b) in zip(out, out[1:]):
        assert b.timestamp == a.timestamp + a.samples
    # libopus alone: after 150-200 ms of PLC it is still far from silent
    dec = OpusDecoder(1)
    for p in packets[:stop]:
        dec.process(EncodedFrame(p, OPUS_48K, N))
    plc = [rms(dec.conceal(N).pcm) for _ in range(10)]
    assert min(plc[FADE_END_MS // 20 :]) > 0.01 * before


def test_silence_fill_is_digital_silence_and_counted(speech):
    """`concealment=False`, the baseline a benchmark compares with: the same timeline and
    counters, zeros where PLC would be."""
    packets, _ = encode(speech[: 4 * RATE], **ARGON)
    arrivals = [a for i, a in enumerate(paced(packets)) if i not in (60, 61, 62)]
    baseline = OpusPlayout(1, concealment=False)
    out = simulate(baseline, arrivals)
    y = pcm_of(out)[:, 0]
    assert not y[60 * N : 63 * N].any() and y[59 * N : 60 * N].any() and y[63 * N : 64 * N].any()
    assert baseline.stats.concealed >= 3 and baseline.stats.fec == 0


# --- what the Argon dial publishes -------------------------------------------------------------

SESSION_ENDING = "argon-voice-ws.md, Publishing: a 0-, 1-byte or > 3,825-byte packet ends the session"


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("ptime", [10, 20, 40, 60])
def test_argon_encoder_never_makes_a_packet_the_server_drops_the_session_for(speech, ptime, channels):
    """Digital silence, speech, a near-silent hiss: with the Argon dial's encoder options every
    packet is 3 to 3,825 bytes (the reference bot drops what it hears of <= 2 bytes too), and
    our own listen role (which checks as the server does) takes each one."""
    rng = np.random.default_rng(0)
    hiss = rng.normal(0, 3, (2 * RATE, 1))
    source = np.concatenate([np.zeros((2 * RATE, 1)), speech[: 3 * RATE], np.zeros((RATE, 1)), hiss])
    pcm = np.repeat(np.clip(np.rint(source), -32768, 32767).astype(np.int16), channels, axis=1)
    packets, _ = encode(pcm, ptime, **ARGON)
    sizes = [len(p) for p in packets]
    assert 3 <= min(sizes) and max(sizes) <= MAX_PACKET, SESSION_ENDING
    assert all(BotSession._check(p) == 48 * ptime for p in packets)


def test_dtx_packets_would_end_the_session_and_are_replaced_by_silence_packets():
    """With DTX on libopus sends the TOC alone (1 byte) in silence, which ends an Argon
    publishing session; `min_packet_bytes` (the Argon dial's 3) sends a silence packet of the
    same duration instead, as the reference bot does (F8 FF FE for 20 ms)."""
    silence = np.zeros((2 * RATE, 1), dtype=np.int16)
    dtx = OpusEncoder(1, 20, dtx=True)
    raw = [dtx.process(AudioFrame(silence[i : i + N], RATE, i))[0].payload for i in range(0, len(silence), N)]
    assert min(len(p) for p in raw) == 1  # what the server would end the session for
    for ptime in (10, 20, 40, 60):
        enc = OpusEncoder(1, ptime, dtx=True, min_packet_bytes=ARGON["opus_min_packet_bytes"])
        n = 48 * ptime
        packets = [enc.process(AudioFrame(silence[i : i + n], RATE, i))[0].payload for i in range(0, len(silence) - n + 1, n)]
        assert enc.filled > len(packets) // 2 and min(len(p) for p in packets) >= 3
        assert silence_packet(n) in packets
        dec = OpusDecoder(1)
        for p in packets:
            (frame,) = dec.process(EncodedFrame(p, OPUS_48K, n))
            assert frame.samples == n == BotSession._check(p)
    assert silence_packet(960) == b"\xf8\xff\xfe"


@pytest.mark.parametrize("channels", [1, 2])
def test_silence_packets_decode_to_digital_silence_of_their_duration(channels):
    for n in (120, 240, 480, 960, 1440, 1920, 2880, 5760):
        packet = silence_packet(n, channels)
        (frame,) = OpusDecoder(channels).process(EncodedFrame(packet, OPUS_48K, n))
        assert frame.samples == packet_samples(packet) == n and not frame.pcm.any()
    with pytest.raises(ValueError):
        silence_packet(100)


def test_expected_loss_decides_whether_libopus_codes_fec(speech):
    """OPUS_SET_PACKET_LOSS_PERC is what switches libopus 1.3 to hybrid (the only mode with
    LBRR): at the Argon dial's complexity at 48 kHz, 5 ('audio', no signal analysis below 7) from 6 % on; at 5 %
    or less it stays CELT and no packet carries FEC, whatever `fec` says."""
    pcm = speech[: 4 * RATE]
    share = {}
    for loss in (0, 5, 6, 10, 30):
        packets, _ = encode(pcm, **{**ARGON, "opus_expected_loss_pct": loss})
        share[loss] = np.mean([packet_has_lbrr(p) for p in packets])
    assert share[0] == share[5] == 0 and min(share[6], share[10], share[30]) > 0.25, share
    with pytest.raises(ValueError, match="0-100"):
        OpusEncoder(1, 20, fec=True, expected_loss_pct=101)


# --- config ------------------------------------------------------------------------------------

CONFIG = """\
server: {http: "127.0.0.1:8080", media: "127.0.0.1:12880"}
services:
  argon: {bot_token: bot-token-x}
routes:
  - name: r
    endpoints:
      - argon: {space_id: s, channel_id: c, hear: someone%s}
      - argon: {role: listen, space_id: s2, channel_id: c2%s}
"""


def build(dial: str = "", listen: str = ""):
    gateway = Gateway(GatewayConfig.from_text(CONFIG % (dial, listen), "gw.yaml"))
    gateway.build()
    return gateway.routes["r"].route.endpoints


def test_argon_options_opus_fec_expected_loss_and_concealment():
    dial, listen = build()
    assert (dial.encoder_options["opus_fec"], dial.encoder_options["opus_expected_loss_pct"], dial.concealment) == (True, 10, True)
    assert listen.concealment and listen.ingress == PCM16_48K and listen.encoder_options["opus_fec"] is False
    dial, listen = build(", opus_fec: false, expected_loss_pct: 25, concealment: false",
                         ", concealment: false, opus_fec: true, expected_loss_pct: 5")
    assert (dial.encoder_options["opus_fec"], dial.encoder_options["opus_expected_loss_pct"], dial.concealment) == (False, 25, False)
    assert not listen.concealment and listen.ingress == OPUS_48K  # as the bot sent it: the route decodes
    assert (listen.encoder_options["opus_fec"], listen.encoder_options["opus_expected_loss_pct"]) == (True, 5)
    with pytest.raises(ConfigError, match=r"gw.yaml:7: routes\[0\].endpoints\[0\].argon.expected_loss_pct: expected at most 100"):
        build(", expected_loss_pct: 150")
    with pytest.raises(ConfigError, match=r"argon.concealment: expected true or false"):
        build("", ", concealment: maybe")


# --- through a running gateway -----------------------------------------------------------------

LISTEN_CHANNEL = """
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s$options}
      - record: {name: heard, path: "$out/heard.wav", rate: 48000}
""" % (SPACE, CHANNEL)
GAP = (65, 66, 67)  # packets the bot withholds: 60 ms in a word, 1.3 s into its clip
SEND_DEADLINE_S = 20.0


class WithholdingBot:
    """A bot that publishes into a channel on `/audio/connect` (StreamToken, then one Opus
    packet per message, paced on absolute deadlines as the reference bot paces its file) and
    withholds some packets: they are never sent, as if its network or its encoder lost them."""

    def __init__(self, gateway, packets: list[bytes], withheld: set[int]) -> None:
        self.api = f"http://127.0.0.1:{gateway.runtime.http.port}"
        self.packets, self.withheld = packets, withheld
        self.statuses: list[str] = []
        self.on_packet: Callable[[int], object] = lambda k: None  # called at packet k's send time (sent or not)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.post(f"{self.api}/IVoice/v1/StreamToken", json={"spaceId": SPACE, "channelId": CHANNEL},
                                         headers={"Authorization": f"Bot {BOT_TOKEN}"})
        assert response.status_code == 200, response.text
        grant = response.json()
        url = f"{grant['ingressUrl']}/audio/connect?token={grant['token']}&frame_duration_ms=20"
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, url)
            self.statuses.append(await ws.get_message())  # {"status":"ready",...}
            start = trio.current_time()
            for k, packet in enumerate(self.packets):
                await trio.sleep_until(start + 0.020 * k)
                self.on_packet(k)
                if k not in self.withheld:
                    await ws.send_message(packet)
            await trio.sleep(0.1)
            try:
                await ws.aclose(1000, "bye")
            except ConnectionClosed:
                pass


def zero_runs(x: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of the runs of exact zeros in `x`."""
    padded = np.concatenate([[1], x != 0, [1]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def gap_window(source: np.ndarray, heard: np.ndarray, delay: int) -> tuple[int, int]:
    """Where the withheld packets' audio belongs in `heard`: the speech before the gap located
    in the recording (cross-correlation), then the gap's place after it."""
    start, end = GAP[0] * N - delay, (GAP[-1] + 1) * N - delay
    before = source[start - 12 * N : start, 0]
    at, corr = locate(before, heard[:, 0])
    assert corr > 0.9, corr
    at += 12 * N  # `before` starts 12 packets ahead of the gap
    return at, at + (end - start)


def locate(clip: np.ndarray, recording: np.ndarray) -> tuple[int, float]:
    """Where in `recording` (sample index) `clip` matches best, and the normalized correlation
    there (FFT cross-correlation over every full overlap)."""
    a, b = clip.astype(np.float64), recording.astype(np.float64)
    size = 1 << (len(a) + len(b)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)[: len(b) - len(a) + 1]
    energy = np.convolve(b * b, np.ones(len(a)), "valid") + 1e-9
    score = xcorr / np.sqrt(energy * np.dot(a, a))
    at = int(np.argmax(score))
    return at, float(score[at])


@pytest.mark.parametrize("concealment", [True, False], ids=["plc", "silence-fill"])
async def test_packets_a_bot_withholds_are_concealed_in_what_the_channel_records(tmp_path, speech, concealment,
                                                                                 stalls):
    """A bot publishes 2 s of speech into our Argon listen channel and withholds three
    packets in the middle of a word; the channel's route records what the channel hears.
    With concealment the 60 ms are filled (PLC, and FEC for the last one when the link is calm
    enough to read the gap as a loss): no hole in the recording, the speech around it intact
    and the stream continuous in time. With `concealment: false` the same 60 ms are digital
    silence: what the route's silence fill gives, and what the test would see without PLC."""
    source = speech[int(0.3 * RATE) : int(2.3 * RATE)]
    packets, delay = encode(source, **ARGON)
    assert min(rms(source[k * N - delay : (k + 1) * N - delay]) for k in GAP) > 1000  # in speech
    options = "" if concealment else ", concealment: false"
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, LISTEN_CHANNEL, out=str(tmp_path), options=options)
        bot = WithholdingBot(gateway, packets, set(GAP))
        channel, recorder = gateway.routes["channel"].route.endpoints
        # the playout's and the recorder's counters from before the speech the gap is placed
        # by (12 packets ahead of it) to well after the speech placed after it has played
        snapshots: dict[int, tuple[PlayoutStats, EndpointStats]] = {}
        marks = (GAP[0] - 13, GAP[-1] + 23)

        def snapshot(k: int) -> None:
            if k in marks and channel.playout is not None:
                snapshots[k] = (attrs.evolve(channel.playout.stats), attrs.evolve(recorder.stats))

        bot.on_packet = snapshot
        with trio.fail_after(SEND_DEADLINE_S):
            await bot.run()
            await gateway.routes["channel"].sessions_done.wait()  # the bot left: played out
        nursery.cancel_scope.cancel()
    heard, rate = read_wav(tmp_path / "heard.wav")
    assert rate == RATE and len(heard) > len(source) * 0.9
    gap_start, gap_end = gap_window(source, heard, delay)
    holes = [(a, n) for a, n in zero_runs(heard[gap_start - 3 * N : gap_end + 3 * N, 0]) if n >= 5 * 48]
    blocks = blockwise_blocks(source[:, 0], RATE, heard[:, 0], RATE)
    # the blocks (250 ms) the gap falls in may score ~0.8; every other one is intact (but for
    # those a stall of the machine reached: the `stalls` fixture)
    assert_blocks_found(blocks, 0.85, "the channel", share=(len(blocks) - 2) / len(blocks), min_blocks=4,
                        starvation=stalls.starvation, timeline=stalls.timeline(tmp_path / "heard.wav"))
    if concealment:
        # not even 5 ms of digital silence where the packets were (but for a slot the route had
        # to fill because the playout's frame came late, on a loaded loop: counted `late`)
        assert len(holes) <= recorder.stats.late, (holes, recorder.stats.late)
        assert rms(heard[gap_start:gap_end]) > 0.1 * rms(heard[gap_start - 3 * N : gap_start])
        assert channel.stats.concealed >= 1  # one PLC frame per slot, or one for the gap once it reads as a loss
        assert len(packets) - len(GAP) - 1 <= channel.stats.frames_in <= len(packets) - len(GAP)
        # continuous in time: the speech after the gap is where it belongs, or (when the
        # gap read as late packets rather than lost ones) one gap later, never overlapping;
        # but for what the playout and the route report they moved the timeline by between
        # the two places, which only a loaded loop makes them do (its late stamps look like
        # jitter): the playout's pause audio dropped or trimmed and the recorder's pacer's
        # pause packets skipped or audio dropped (earlier); PLC inserted in pauses, slots
        # concealed beyond the gap's own (late packets), slots the recorder's pacer filled
        # (later). Calm, all of those are 0: the check is exact
        after = source[(GAP[-1] + 1) * N - delay : (GAP[-1] + 13) * N - delay, 0]
        corr, lag = best_alignment(after, RATE, heard[gap_end - 4 * N : gap_end + 16 * N, 0], RATE, max_lag_s=0.2)
        shift = lag * RATE - 4 * N
        (a, ra), (b, rb) = snapshots[marks[0]], snapshots[marks[1]]
        earlier = (b.dropped_ms - a.dropped_ms + b.trimmed_ms - a.trimmed_ms) * 48 + (
            rb.skipped - ra.skipped + rb.dropped - ra.dropped) * N
        later = (b.inserted_ms - a.inserted_ms) * 48 + (max(0, b.concealed - a.concealed - len(GAP)) + rb.late - ra.late) * N
        placed = [base for base in (0, len(GAP) * N) if -earlier - 48 <= shift - base <= later + 48]
        assert corr > 0.9 and placed, (corr, shift, earlier, later, a, b, ra, rb)
    else:
        # a run of digital silence of 40 ms or more; where a stall of the machine reached the
        # gap's audio (the bot's late packets played into the gap), of one slot or more: still
        # the silence fill, never PLC (which leaves not even 5 ms of exact zeros, above)
        recorded = stalls.timeline(tmp_path / "heard.wav")
        stalled = recorded is not None and stalls.starvation.overlaps(
            recorded.time_at(gap_start / RATE), recorded.time_at(gap_end / RATE), STALL_REACH_S)
        longest = max((n for _, n in holes), default=0)
        assert longest >= (20 if stalled else 40) * 48, (holes, stalled, stalls.starvation.stretches)
        assert channel.stats.concealed == 0 and channel.ingress == OPUS_48K


HEAR_PERSON = """
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s, opus_fec: true}
      - file: {name: person, identity: person, path: "$person", rate: 48000}
  - name: recorder
    endpoints:
      - argon: {space_id: %s, channel_id: %s, hear: person, publish: false}
      - record: {path: "$out/recorded.wav", rate: 48000}
""" % (SPACE, CHANNEL, SPACE, CHANNEL)


async def test_packets_lost_before_the_dial_hears_them_are_concealed_and_counted(tmp_path, monkeypatch, speech):
    """The dial's hear half (`/audio/subscribe`): the channel forwards a person's packets with
    FEC, and three single packets of speech (the 15th, 40th and 65th that carry LBRR) never
    reach the bot (a proxy that drops them). The bot's playout conceals each (`concealed`),
    from FEC where the packet after it came in time (`fec_recovered`), and the recording has
    no hole where they were."""
    person = read48k("or109.wav")[int(0.7 * RATE) : int(3.0 * RATE)]
    write_wav(tmp_path / "person.wav", person, RATE)
    sent = [0, 0]  # packets forwarded, of them with LBRR
    dropped_at: list[int] = []
    real_forward = room_module.Room.forward

    def forward(self, identity, packet):
        if identity == "person":
            sent[0] += 1
            sent[1] += packet_has_lbrr(packet)
            if packet_has_lbrr(packet) and sent[1] in (15, 40, 65):
                dropped_at.append(sent[0])
                return None
        return real_forward(self, identity, packet)

    monkeypatch.setattr(room_module.Room, "forward", forward)
    playouts: list[OpusPlayout] = []  # one per session of the bot (it reconnects when the channel ends)

    def new_playout(*args, **kwargs) -> OpusPlayout:
        playouts.append(OpusPlayout(*args, **kwargs))
        return playouts[-1]

    monkeypatch.setattr(dial_module, "OpusPlayout", new_playout)
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, HEAR_PERSON, person=str(tmp_path / "person.wav"), out=str(tmp_path))
        with trio.fail_after(SEND_DEADLINE_S):
            await gateway.routes["channel"].sessions_done.wait()
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    bot = gateway.routes["recorder"].route.endpoints[0]
    st = playouts[0].stats  # the session that heard the person (it reconnects when the channel ends)
    print(f"dropped {dropped_at} of {sent[0]}: fec {st.fec}, missed {st.fec_missed}, concealed {st.concealed}, "
          f"late {st.late}, jitter {st.jitter_ms:.2f} ms, delay {st.delay_ms:.1f} ms, {len(playouts)} sessions")
    assert len(dropped_at) == 3
    decoded = sum(p.stats.decoded for p in playouts)
    assert sent[0] - 3 - 5 <= decoded <= sent[0] - 3
    # each loss is concealed; a loss right behind a stall of the channel's own pacer (a loaded
    # loop) can read as part of the stall's burst, and the slot is then not filled but skipped
    assert bot.stats.concealed >= len(dropped_at) - 1
    assert bot.stats.fec_recovered == sum(p.stats.fec for p in playouts)
    if st.late == 0 and st.jitter_ms < 1.0:  # a calm link: each gap reads as a loss: FEC, or a miss
        assert st.fec + st.fec_missed >= 2, st
    heard, _ = read_wav(tmp_path / "recorded.wav")
    x = heard[:, 0]
    at, _ = locate(person[: RATE, 0], x)  # the person's first second, in the recording
    # from the person's first word to 250 ms before the file ends (the channel then closes)
    first = at + int(np.flatnonzero(np.abs(person[:, 0]) > 1000)[0])
    last = at + len(person) - RATE // 4
    holes = [(a, n) for a, n in zero_runs(x[first:last]) if n >= 10 * 48]
    # none where the packets were lost: a hole is only ever a slot the route itself had to fill
    # with silence because the playout's frame came late (a loaded loop), counted `late`
    recorder = gateway.routes["recorder"].route.endpoints[1]
    assert len(holes) <= recorder.stats.late, (holes, recorder.stats.late)
    blocks = blockwise_alignment(person[:, 0], RATE, x, RATE)
    assert len(blocks) >= 6 and sum(b > 0.85 for b in blocks) >= len(blocks) - 3, np.round(blocks, 2)
