"""OpusPlayout (gateway/codecs/playout.py) and its trio driver (gateway/adapters/argon/hear.py):
Opus packets with arrival times only (no sequence numbers, no timestamps), as Argon forwards
what a participant sends, played out as a steady PCM stream.

Everything runs on real libopus with real speech (the bundled 8 kHz recordings, resampled to
48 kHz with soxr) or tones. Time is explicit: the pure object is driven by `simulate` (a
discrete-event loop over arrival times and `next_deadline()`), the driver by trio's MockClock
(`autojump_clock`), so nothing depends on the load of the machine.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
import trio

from audio_checks import best_alignment
from gateway.adapters.argon.hear import play_out
from gateway.codecs import AudioFrame, EncodedFrame, OpusDecoder, OpusEncoder, packet_samples
from gateway.codecs.formats import OPUS_48K
from gateway.codecs.playout import FADE_END_MS, IDLE_AFTER_MS, PLC_FULL_MS, OpusPlayout

ASSETS = Path(__file__).resolve().parent.parent / "gateway" / "assets"
RATE = 48000
T0 = 100.0  # arrival time of the first packet (s); any clock origin works
TAIL = IDLE_AFTER_MS // 20  # concealment frames after the last 20 ms packet before idle


def read_wav(name: str) -> tuple[np.ndarray, int]:
    with wave.open(str(ASSETS / name)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return pcm, w.getframerate()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """~16 s of speech with its natural pauses (or105 + or109, 8 kHz), at 48 kHz, int16 (n, 1)."""
    parts = []
    for name in ("or105.wav", "or109.wav"):
        pcm, rate = read_wav(name)
        parts.append(soxr.resample(pcm[:, 0].astype(np.float32), rate, RATE, quality="VHQ"))
    y = np.concatenate(parts)
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16).reshape(-1, 1)


def take(pcm: np.ndarray, seconds: float) -> np.ndarray:
    """The first `seconds` of `pcm`, looped if it is shorter."""
    n = int(seconds * RATE)
    return np.tile(pcm, (-(-n // len(pcm)), 1))[:n]


def tone(freq: float, seconds: float, amplitude: float = 10000) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16).reshape(-1, 1)


def encode(pcm: np.ndarray, ptime: int = 20, **options) -> tuple[list[bytes], int]:
    """Opus packets of `ptime` ms and the encoder delay (samples)."""
    enc = OpusEncoder(pcm.shape[1], ptime, complexity=5, **options)
    n = 48 * ptime
    packets = [enc.process(AudioFrame(np.ascontiguousarray(pcm[i : i + n]), RATE, i))[0].payload
               for i in range(0, len(pcm) - n + 1, n)]
    return packets, enc.delay


def paced(packets: list[bytes], start: float = T0, rate: float = 1.0) -> list[tuple[float, bytes]]:
    """Arrivals of a sender paced by the TOC durations (the reference bot), its clock running
    at `rate` x ours."""
    arrivals, t = [], start
    for p in packets:
        arrivals.append((t, p))
        t += packet_samples(p) / RATE * rate
    return arrivals


def simulate(playout: OpusPlayout, arrivals, until: float = math.inf, probe=None) -> list[tuple[float, AudioFrame]]:
    """Run the playout over `arrivals` [(time, packet)]: push each packet at its time, pull at
    each deadline (a packet arriving at a deadline goes in first, as the trio driver does).
    Returns (emit time, frame) pairs; `probe(playout, now)` is called after every step."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    out, i = [], 0
    while True:
        deadline = playout.next_deadline()
        arrival = arrivals[i][0] if i < len(arrivals) else None
        if arrival is not None and (deadline is None or arrival <= deadline):
            if arrival > until:
                break
            playout.push(arrivals[i][1], arrival)
            i += 1
            now = arrival
        elif deadline is not None and deadline <= until:
            out += [(deadline, f) for f in playout.pull(deadline)]
            now = deadline
        else:
            break
        if probe is not None:
            probe(playout, now)
    return out


def pcm_of(out) -> np.ndarray:
    return np.concatenate([f.pcm for _, f in out])


def assert_contiguous(out) -> None:
    """Timestamps continue sample for sample across everything (PLC, drops, idle)."""
    for (_, a), (_, b) in zip(out, out[1:]):
        assert b.timestamp == a.timestamp + a.samples
        assert b.rate == RATE and b.pcm.dtype == np.int16 and b.pcm.flags.c_contiguous


def runs(out) -> list[list[tuple[float, AudioFrame]]]:
    """Split the output where emission stopped (idle) and restarted."""
    groups = [[out[0]]]
    for prev, cur in zip(out, out[1:]):
        if cur[0] - prev[0] > prev[1].duration + 1e-6:
            groups.append([])
        groups[-1].append(cur)
    for group in groups:
        for (t0, a), (t1, b) in zip(group, group[1:]):
            assert abs(t1 - (t0 + a.duration)) < 1e-6  # steady within a run
    return groups


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(float) ** 2)))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float) - a.mean(), b.astype(float) - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def speech_block_scores(src: np.ndarray, y: np.ndarray, block_s: float = 0.25, slack_s: float = 0.5) -> list[float]:
    """Correlation of each `block_s` block of speech in the source (mono) with the output
    near the same place, each block at its own best lag: drops and insertions in pauses shift
    the output by a few ms here and there, which costs nothing per block, while lost or
    garbled speech would."""
    scores = []
    n, slack = int(block_s * RATE), int(slack_s * RATE)
    loud = 0.3 * rms(src)
    for i in range(0, len(src) - n, n):
        if rms(src[i : i + n]) < loud:
            continue  # a pause: nothing to compare
        if i + n + slack > len(y):
            break  # the end of the source that the output (shorter by what was dropped) lacks
        window = y[max(0, i - slack) : i + n + slack]
        scores.append(best_alignment(src[i : i + n], RATE, window, RATE, max_lag_s=2 * slack_s)[0])
    return scores


def reference_decode(packets, channels: int = 1, lost=(), fec=False) -> np.ndarray:
    """What a decoder given every packet in order (PLC, or FEC from the next packet, for the
    `lost` ones) produces."""
    dec, out = OpusDecoder(channels), []
    for k, p in enumerate(packets):
        if k in lost:
            out.append(dec.conceal(packet_samples(p), packets[k + 1] if fec else None).pcm)
        else:
            out.append(dec.process(EncodedFrame(p, OPUS_48K, 0, 0))[0].pcm)
    return np.concatenate(out)


# --- steady arrival --------------------------------------------------------------------------


def test_steady_arrival_plays_continuously_at_min_delay(speech):
    src = take(speech, 8)
    packets, delay = encode(src)
    playout = OpusPlayout(1)
    arrivals = paced(packets)
    out = simulate(playout, arrivals)

    decoded = out[: len(packets)]
    for (arrived, _), (emitted, frame) in zip(arrivals, decoded):
        assert emitted == pytest.approx(arrived + 0.020, abs=1e-9)  # added delay = min_delay
        assert frame.samples == 960 and frame.channels == 1
    assert_contiguous(out)
    assert len(runs(out)) == 1
    st = playout.stats
    assert (st.received, st.decoded, st.late, st.malformed, st.dropped_ms, st.inserted_ms) == (len(packets), len(packets), 0, 0, 0, 0)
    assert st.concealed == TAIL  # only the fade after the last packet, then idle
    assert st.delay_ms == pytest.approx(20) and st.jitter_ms < 0.01
    assert playout.next_deadline() is None and not playout.running
    # the decoded speech is the source (bit-exact with a plain decoder, and close to the input)
    y = pcm_of(decoded)
    assert np.array_equal(y, reference_decode(packets))
    c, lag = best_alignment(src[:, 0], RATE, y[:, 0], RATE)
    assert c > 0.95 and lag * RATE == pytest.approx(delay, abs=8)


def test_first_pull_before_deadline_returns_nothing(speech):
    packets, _ = encode(take(speech, 1))
    playout = OpusPlayout(1)
    assert playout.next_deadline() is None and playout.pull(T0) == []
    playout.push(packets[0], T0)
    assert playout.next_deadline() == pytest.approx(T0 + 0.020)
    assert playout.pull(T0 + 0.019) == []
    (frame,) = playout.pull(T0 + 0.020)
    assert frame.timestamp == 0 and frame.samples == 960


# --- jitter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jitter_adapts_then_no_concealment(speech, seed):
    """Arrivals ±15 ms around the 20 ms grid: a late packet or two while the delay adapts,
    then no concealment at all, with the delay target at most 60 ms."""
    rng = np.random.default_rng(seed)
    packets, _ = encode(take(speech, 16))
    arrivals = [(T0 + k * 0.020 + rng.uniform(-0.015, 0.015), p) for k, p in enumerate(packets)]
    playout = OpusPlayout(1)
    delays, adapting, total = [], [0], [None]

    def probe(pl, now):
        delays.append(pl.stats.delay_ms)
        if now <= T0 + 3.0:
            adapting[0] = pl.stats.concealed
        if pl.stats.decoded == len(packets) and total[0] is None:
            total[0] = pl.stats.concealed  # when the last packet has played

    out = simulate(playout, arrivals, probe=probe)
    st = playout.stats
    assert st.decoded == len(packets)
    assert adapting[0] <= 3  # while it adapts (first 3 s)
    assert total[0] == adapting[0]  # none after
    assert max(delays) <= 60
    assert 30 <= st.delay_ms <= 60  # covers the 30 ms spread of the arrivals
    assert_contiguous(out)


def test_the_delay_target_never_exceeds_max_delay():
    """±50 ms of jitter is more than 60 ms can cover: the target pins at max_delay_ms (late
    packets are concealed and played next), and a custom ceiling is honoured too."""
    rng = np.random.default_rng(11)
    packets, _ = encode(tone(440, 6.0))
    arrivals = [(T0 + k * 0.020 + rng.uniform(-0.05, 0.05), p) for k, p in enumerate(packets)]
    for ceiling in (60, 45):
        playout = OpusPlayout(1, max_delay_ms=ceiling)
        delays = []
        out = simulate(playout, arrivals, probe=lambda pl, now: delays.append(pl.stats.delay_ms))
        assert max(delays) == pytest.approx(ceiling)
        assert playout.stats.late > 0 and playout.stats.decoded == len(packets)
        assert_contiguous(out)


# --- loss, PLC and FEC -----------------------------------------------------------------------

LOST_IN_SPEECH = (50, 60, 70, 80, 90, 100, 260, 270, 280)  # 20 ms packets within speech


def test_one_lost_packet_conceals_exactly_its_slot(speech):
    src = take(speech, 6)
    packets, delay = encode(src)
    k = 71  # within speech
    arrivals = [a for i, a in enumerate(paced(packets)) if i != k]
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals, until=arrivals[-1][0] + 0.0205)
    st = playout.stats
    assert st.concealed == 1 and st.late == 0 and st.decoded == len(packets) - 1
    assert st.dropped_ms == st.inserted_ms == 0
    assert_contiguous(out)
    assert len(out) == len(packets)  # the lost slot is filled in, the clock stays whole
    y = pcm_of(out)[:, 0]
    slot = y[k * 960 : (k + 1) * 960]
    original = src[k * 960 - delay : (k + 1) * 960 - delay, 0]
    # PLC, not silence: energy of the neighbourhood, continuing the signal
    assert rms(slot) > 0.3 * rms(y[(k - 2) * 960 : k * 960])
    assert corr(slot[:240], original[:240]) > 0.8 and corr(slot, original) > 0.5
    # and the rest is intact: sample for sample what a decoder told of the loss produces
    # (this packet has no FEC data: libopus's decode_fec falls back to the same PLC)
    assert np.array_equal(y, reference_decode(packets, lost={k})[:, 0])


def test_fec_recovers_lost_packets_when_the_next_one_is_buffered(speech):
    """20 ms packets with in-band FEC: the arrival spacing (40 ms instead of 20, with low
    jitter) says one packet is missing while the next one is already here, so the slot is
    decoded from the next packet's LBRR, which beats PLC."""
    src = take(speech, 6)
    packets, delay = encode(src, fec=True)
    arrivals = [a for i, a in enumerate(paced(packets)) if i not in LOST_IN_SPEECH]
    scores = {}
    for min_delay in (20, 40):  # the next packet arrives just at, or well before, the deadline
        playout = OpusPlayout(1, min_delay_ms=min_delay)
        out = simulate(playout, arrivals, until=arrivals[-1][0] + min_delay / 1000 + 0.005)
        st = playout.stats
        assert (st.concealed, st.fec, st.late) == (len(LOST_IN_SPEECH), len(LOST_IN_SPEECH), 0)
        y = pcm_of(out)[:, 0]
        assert np.array_equal(y[: len(packets) * 960], reference_decode(packets, lost=set(LOST_IN_SPEECH), fec=True)[:, 0])
        scores[min_delay] = [corr(y[k * 960 : (k + 1) * 960], src[k * 960 - delay : (k + 1) * 960 - delay, 0])
                             for k in LOST_IN_SPEECH]
    plc = reference_decode(packets, lost=set(LOST_IN_SPEECH))[:, 0]
    plc_scores = [corr(plc[k * 960 : (k + 1) * 960], src[k * 960 - delay : (k + 1) * 960 - delay, 0]) for k in LOST_IN_SPEECH]
    assert np.mean(scores[20]) > 0.8
    assert np.mean(scores[20]) > np.mean(plc_scores) + 0.1


def test_no_loss_is_inferred_on_a_jittery_link(speech):
    """With ±15 ms of jitter a 40 ms spacing is not evidence of a loss: no FEC guesswork, the
    missing slot is concealed when its deadline comes."""
    rng = np.random.default_rng(7)
    packets, _ = encode(take(speech, 8), fec=True)
    arrivals = [(T0 + k * 0.020 + rng.uniform(-0.015, 0.015), p) for k, p in enumerate(packets) if k != 300]
    playout = OpusPlayout(1)
    simulate(playout, arrivals)
    assert playout.stats.fec == 0
    assert playout.stats.decoded == len(packets) - 1


def test_a_stall_is_not_a_loss_and_its_latency_is_won_back_in_pauses(speech):
    """TCP stall: packets 60-64 are held back and arrive together (82 ms late for the first,
    spaced like a loss of four). The burst shows it was a stall: the first packet counts as
    late, no FEC guesswork; it plays next, nothing is thrown away, and the latency the stall
    added is won back later from pause audio only."""
    src = take(speech, 10)
    packets, _ = encode(src, fec=True)
    arrivals = paced(packets)
    release = arrivals[64][0] + 0.002
    arrivals = [(max(t, release) if 60 <= k <= 64 else t, p) for k, (t, p) in enumerate(arrivals)]
    playout = OpusPlayout(1)
    depth = []
    out = simulate(playout, arrivals, probe=lambda pl, now: depth.append((now, pl.stats.depth_ms)))
    st = playout.stats
    assert st.late == 1 and st.fec == 0
    assert st.decoded == len(packets)  # every packet played (or dropped in a pause), none lost
    assert 1 <= st.concealed - TAIL <= 4
    assert st.dropped_ms >= 20  # the latency the stall added, won back
    assert st.trimmed_ms == 0
    # what was dropped was pause audio: block by block, the speech is all there
    y = pcm_of(out)[:, 0]
    scores = speech_block_scores(src[:, 0], y)
    assert np.median(scores) > 0.9 and np.mean(np.array(scores) > 0.8) > 0.9
    # the stall raised the delay target at once (it must cover such a late packet next
    # time); in the calm that follows it shrinks slowly, and the buffer follows the target
    assert 20 < st.delay_ms < 60
    late_depth = [d for t, d in depth if t > arrivals[-1][0] - 2.0]
    assert max(late_depth) <= st.delay_ms + 20 + 5
    assert_contiguous(out)


# --- frame sizes and channels ----------------------------------------------------------------


def test_mixed_packet_sizes_including_2_5_ms_celt(speech):
    src = take(speech, 6)
    enc = OpusEncoder(1, None, complexity=5)
    sizes = [480, 960, 1920, 2880, 960, 120, 120, 120, 120, 480] * 40
    packets, i = [], 0
    for n in sizes:
        if i + n > len(src):
            break
        packets.append(enc.process(AudioFrame(np.ascontiguousarray(src[i : i + n]), RATE, i))[0].payload)
        i += n
    assert {packet_samples(p) for p in packets} == {120, 480, 960, 1920, 2880}
    assert any(p[0] >> 3 >= 16 and packet_samples(p) == 120 for p in packets)  # 2.5 ms CELT
    playout = OpusPlayout(1)
    arrivals = paced(packets)
    out = simulate(playout, arrivals, until=arrivals[-1][0] + 0.0205)
    st = playout.stats
    assert (st.concealed, st.late, st.decoded) == (0, 0, len(packets))
    assert_contiguous(out)
    assert [f.samples for _, f in out] == [packet_samples(p) for p in packets]
    y = pcm_of(out)
    assert np.array_equal(y, reference_decode(packets))
    c, _ = best_alignment(src[:i, 0], RATE, y[:, 0], RATE)
    assert c > 0.9


def test_a_lost_2_5_ms_packet_is_concealed_in_2_5_ms(speech):
    enc = OpusEncoder(1, None, application="restricted_lowdelay", complexity=5)
    src = take(speech, 3)[RATE:]  # from within speech: a silent first packet is no start
    packets = [enc.process(AudioFrame(np.ascontiguousarray(src[i : i + 120]), RATE, i))[0].payload
               for i in range(0, 120 * 400, 120)]
    arrivals = [a for k, a in enumerate(paced(packets)) if k != 300]
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals, until=arrivals[-1][0] + 0.0205)
    assert playout.stats.concealed == 1 and playout.stats.decoded == 399
    assert [f.samples for _, f in out] == [120] * 400


def test_stereo_packets_into_mono_playout_and_back():
    pcm, rate = read_wav("stereo48k.wav")
    assert rate == RATE and pcm.shape[1] == 2
    packets, _ = encode(pcm[: 2 * RATE], 20)
    playout = OpusPlayout(1)
    out = simulate(playout, paced(packets))
    y = pcm_of(out[: len(packets)])
    assert y.shape == (len(packets) * 960, 1)
    spectrum = np.abs(np.fft.rfft(y[4800:, 0] * np.hanning(len(y) - 4800)))
    bins = np.fft.rfftfreq(len(y) - 4800, 1 / RATE)
    for hz in (262, 392):  # both channels' tones are in the mono mix
        assert spectrum[np.abs(bins - hz) < 3].max() > 100 * np.median(spectrum)

    mono, _ = encode(tone(440, 1.0), 20)
    playout = OpusPlayout(2)
    out = simulate(playout, paced(mono))
    y = pcm_of(out[: len(mono)])
    assert y.shape[1] == 2 and np.array_equal(y[:, 0], y[:, 1]) and rms(y[4800:]) > 5000


# --- DTX, silence, idle and restart ----------------------------------------------------------


@pytest.mark.parametrize("forwarded", ["all", "thinned"])
def test_dtx_keeps_output_continuous_then_idles(speech, forwarded):
    """Speech, 3 s of silence coded with DTX (libopus: 1-byte packets every 20 ms and a 59-byte
    update every 400 ms; 'thinned': only a packet every 400 ms reaches us), then speech again."""
    src = take(speech, 6)
    signal = np.concatenate([src[int(0.9 * RATE) : int(2.2 * RATE)], np.zeros((3 * RATE, 1), np.int16),
                             src[int(1.0 * RATE) : int(2.2 * RATE)]])
    packets, _ = encode(signal, 20, dtx=True, application="voip")
    arrivals = paced(packets)
    if forwarded == "thinned":  # a WebRTC sender does not send packets of <= 2 bytes
        arrivals = [a for a in arrivals if len(a[1]) > 2]
    silence = [(t, p) for t, p in arrivals if T0 + 1.45 < t < T0 + 4.25]
    gaps = np.diff([t for t, _ in silence])
    if forwarded == "thinned":
        assert np.all((gaps[1:] > 0.35) & (gaps[1:] < 0.45))  # one DTX update every ~400 ms
    else:
        assert gaps.max() < 0.021 and sum(len(p) == 1 for _, p in silence) > 100
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals)
    assert_contiguous(out)  # timestamps continue across the idle stretch
    first, second = runs(out)
    # first run: continuous until 200 ms after the end of the last decoded audio, then idle
    last = max(t for t, p in arrivals if len(p) > 2 and t < T0 + 1.5)
    end_first = first[-1][0] + first[-1][1].duration
    assert end_first == pytest.approx(last + 0.020 + 0.020 + IDLE_AFTER_MS / 1000, abs=1e-6)
    assert np.all(first[-1][1].pcm == 0)  # faded out to silence before stopping
    # nothing while the DTX updates come in; the speech restarts the stream, fading in
    assert second[0][0] >= T0 + 4.2
    assert np.abs(np.diff(second[0][1].pcm[:240, 0].astype(int))).max() < 300
    st = playout.stats
    assert st.dtx == sum(len(p) <= 2 for _, p in arrivals)
    assert st.malformed == 0 and st.late == 0


def test_dtx_toc_only_packets_every_400_ms(speech):
    """The case the spec names: during silence one TOC-only packet every ~400 ms."""
    packets, _ = encode(take(speech, 2.2)[int(0.9 * RATE) :])
    arrivals = paced(packets)
    t = arrivals[-1][0] + 0.02
    dtx = [(t + 0.4 * i, bytes([packets[0][0] & 0xFC])) for i in range(10)]  # same config, code 0
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals + dtx)
    (only,) = runs(out)
    assert only[-1][0] + only[-1][1].duration == pytest.approx(t + 0.020 + 0.2, abs=0.021)
    assert playout.stats.dtx == 10 and not playout.running
    assert playout.stats.concealed <= TAIL + 1


@pytest.mark.parametrize("outage_ms", [60, 120, 400, 1000])
def test_a_gap_then_audio_joins_without_a_click(outage_ms):
    """A 150 Hz tone (slope at most ~200 per sample) with the sender silent for `outage_ms`:
    PLC, fade, maybe idle, then the tone again. Around the join no sample step exceeds the
    tone's own: no click, whether the join lands in the PLC, in the fade or after idle."""
    packets, _ = encode(tone(150, 3.0))
    k0, gap = 50, outage_ms // 20
    arrivals = [(t + (0.0137 if k >= k0 else 0), p) for k, (t, p) in enumerate(paced(packets)) if not k0 <= k < k0 + gap]
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals)
    assert_contiguous(out)  # timestamps continue across the gap (and the idle stretch)
    y = pcm_of(out)[:, 0].astype(int)
    natural = np.abs(np.diff(y[4800 : k0 * 960])).max()
    resumed = arrivals[k0][0]
    j = sum(f.samples for t, f in out if t < resumed)
    assert np.abs(np.diff(y[j - 960 : j + 960])).max() <= natural * 1.05
    # the gap: PLC continues the tone (libopus decays it), then our fade reaches silence
    gap_start = k0 * 960
    assert rms(y[gap_start : gap_start + 960]) > 2000
    if outage_ms > FADE_END_MS + 20:
        assert np.all(y[gap_start + FADE_END_MS * 48 : j] == 0)
        ramp = np.abs(y[gap_start + PLC_FULL_MS * 48 : gap_start + FADE_END_MS * 48])
        assert ramp[-480:].max() < ramp[:480].max() / 4 + 1
    groups = runs(out)
    if outage_ms > IDLE_AFTER_MS:
        assert len(groups) == 2
        assert groups[1][0][0] == pytest.approx(resumed + 0.020)  # new anchor at the next packet
        assert np.all(groups[0][-1][1].pcm == 0)
        assert np.abs(groups[1][0][1].pcm[:8]).max() < 100  # fades in from silence
    else:
        assert len(groups) == 1
    # the tone is back at full level
    assert rms(y[-(TAIL + 20) * 960 : -(TAIL + 5) * 960]) > 6000


def test_idle_restart_continues_timestamps_and_ignores_silent_packets(speech):
    src = take(speech, 4)[int(0.9 * RATE) :]
    packets, _ = encode(src)
    silent, _ = encode(np.zeros((RATE, 1), np.int16))
    arrivals = paced(packets[:50])
    t = arrivals[-1][0] + 1.0
    arrivals += [(t + 0.02 * i, p) for i, p in enumerate(silent[25:])]  # digital silence packets
    arrivals += [(t + 1.0 + 0.02 * i, bytes.fromhex("f8fffe")) for i in range(10)]  # the bot's silence
    arrivals += paced(packets[50:100], start=t + 2.0)
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals)
    first, second = runs(out)
    assert second[0][0] == pytest.approx(t + 2.0 + 0.020)
    assert second[0][1].timestamp == first[-1][1].timestamp + first[-1][1].samples
    assert playout.stats.decoded == 100 + 25 + 10


# --- malformed packets -----------------------------------------------------------------------


def test_malformed_packets_are_counted_concealed_and_the_stream_goes_on(speech):
    src = take(speech, 6)
    packets, delay = encode(src)
    rng = np.random.default_rng(5)
    garbage = []
    while len(garbage) < 3:  # random bytes that are not valid Opus framing
        candidate = rng.integers(0, 256, int(rng.integers(3, 200)), dtype=np.uint8).tobytes()
        try:
            packet_samples(candidate)
        except Exception:
            garbage.append(candidate)
    bad = {
        70: garbage[0],
        90: garbage[1],
        110: b"\x0b\x05" + bytes(21),  # code 3, 5 CBR frames: 21 bytes do not split in 5
        130: b"\x0b",  # code 3 with no frame-count byte
        140: b"\x0b\x83\xfa\xfa" + bytes(10),  # code 3 VBR, frame lengths past the end: truncated
        150: garbage[2],
        170: b"",
    }
    arrivals = [(t, bad.get(k, p)) for k, (t, p) in enumerate(paced(packets))]
    playout = OpusPlayout(1)
    out = simulate(playout, arrivals, until=arrivals[-1][0] + 0.0205)
    st = playout.stats
    assert (st.malformed, st.concealed, st.decoded) == (len(bad), len(bad), len(packets) - len(bad))
    assert_contiguous(out)
    assert len(out) == len(packets)
    y = pcm_of(out)[:, 0]
    good = reference_decode(packets, lost=set(bad))[:, 0]
    assert np.array_equal(y, good)
    c, _ = best_alignment(src[:, 0], RATE, y, RATE)
    assert c > 0.9


def test_malformed_or_dtx_packets_alone_never_start_a_stream():
    playout = OpusPlayout(1)
    for i, packet in enumerate([b"", b"\x03", b"\xf8", b"\xf8\x00", b"\x0b\x05" + bytes(21)]):
        playout.push(packet, T0 + 0.02 * i)
    assert playout.next_deadline() is None and playout.stats.received == 5
    assert playout.stats.malformed == 3 and playout.stats.dtx == 2


# --- sender clock drift ----------------------------------------------------------------------


@pytest.mark.parametrize("drift", [-0.005, 0.005])
def test_sender_clock_drift_neither_grows_latency_nor_conceals(speech, drift):
    """60 s of packets from a sender whose 20 ms are 20 ms x (1 + drift) of ours: the buffer
    drops (fast sender) or inserts (slow sender) about 0.5 % of the time, in pauses only, and
    never conceals."""
    packets, _ = encode(take(speech, 60))
    arrivals = paced(packets, rate=1 + drift)
    playout = OpusPlayout(1)
    depth = []
    out = simulate(playout, arrivals, probe=lambda pl, now: depth.append(pl.stats.depth_ms))
    st = playout.stats
    assert st.concealed == TAIL and st.late == 0 and st.trimmed_ms == 0  # only the final fade
    assert st.decoded == len(packets)
    moved = st.dropped_ms if drift < 0 else st.inserted_ms
    assert moved == pytest.approx(60_000 * abs(drift), rel=0.2)
    assert (st.inserted_ms if drift < 0 else st.dropped_ms) <= 20
    assert max(depth) <= 45  # the latency stays bounded
    assert st.delay_ms <= 25
    assert_contiguous(out)
    y = pcm_of(out[:-TAIL])[:, 0]
    assert len(y) == pytest.approx(len(packets) * 960 * (1 + drift), rel=0.001)  # follows the sender
    # the speech is intact (drops and inserts are in pauses; they only shift it a little):
    # checked on the last 20 s, where the output has shifted most (±0.2 s)
    last = 40 * RATE
    scores = speech_block_scores(take(speech, 60)[last:, 0], y[last:], slack_s=0.6)
    assert np.median(scores) > 0.9 and np.mean(np.array(scores) > 0.8) > 0.9


# --- the trio driver -------------------------------------------------------------------------


async def _sender(send, schedule):
    """The connection's reader: each packet at its time, stamped with trio.current_time();
    the channel closes after the last one."""
    async with send:
        for at, packet in schedule:
            await trio.sleep_until(at)
            send.send_nowait((packet, trio.current_time()))


async def test_driver_emits_each_frame_at_its_deadline(speech, autojump_clock):
    packets, _ = encode(take(speech, 2))
    start = trio.current_time() + 1.0
    schedule = [(start + 0.020 * k, p) for k, p in enumerate(packets)]
    emitted = []
    send, receive = trio.open_memory_channel(64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sender, send, schedule)
        await play_out(receive, lambda frame: emitted.append((trio.current_time(), frame)), OpusPlayout(1))
        returned = trio.current_time()
    assert len(emitted) == len(packets)
    for k, (t, frame) in enumerate(emitted):
        assert t == pytest.approx(start + 0.020 * k + 0.020, abs=1e-6)
        assert frame.timestamp == 960 * k
    # the channel closed after the last packet: it returns once that one has played
    assert returned == pytest.approx(emitted[-1][0])


async def test_driver_wakes_early_on_a_packet_after_idle(speech, autojump_clock):
    packets, _ = encode(take(speech, 2)[int(0.9 * RATE) :])
    start = trio.current_time() + 1.0
    later = start + 5.0
    schedule = [(start + 0.020 * k, p) for k, p in enumerate(packets[:20])]
    schedule += [(later + 0.020 * k, p) for k, p in enumerate(packets[20:30])]
    emitted = []
    playout = OpusPlayout(1)
    send, receive = trio.open_memory_channel(64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sender, send, schedule)
        await play_out(receive, lambda frame: emitted.append((trio.current_time(), frame)), playout)
    times = [t for t, _ in emitted]
    idle_end = start + 0.020 * 20 + 0.020 + IDLE_AFTER_MS / 1000
    assert max(t for t in times if t < later) == pytest.approx(idle_end - 0.020, abs=1e-6)
    after = [t for t in times if t >= later]
    assert after[0] == pytest.approx(later + 0.020, abs=1e-6)  # woke on the packet, not on a poll
    assert len(after) == 10
    for (_, a), (_, b) in zip(emitted, emitted[1:]):
        assert b.timestamp == a.timestamp + a.samples


async def test_driver_plays_a_burst_in_order_and_never_conceals_a_waiting_packet(speech, autojump_clock):
    """Packets that arrive together (a stall released) are all pushed before any deadline is
    served: none of them is concealed while it waits in the channel."""
    packets, _ = encode(take(speech, 2))
    start = trio.current_time() + 1.0
    schedule = [(start + 0.020 * k, p) for k, p in enumerate(packets[:20])]
    burst_at = start + 0.020 * 25 + 0.001
    schedule += [(burst_at, p) for p in packets[20:26]]
    schedule += [(start + 0.020 * k, p) for k, p in enumerate(packets[26:60], start=26)]
    playout = OpusPlayout(1)
    emitted = []
    send, receive = trio.open_memory_channel(64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sender, send, schedule)
        await play_out(receive, lambda frame: emitted.append((trio.current_time(), frame)), playout)
    st = playout.stats
    assert st.decoded == 60 and st.late == 1
    assert st.concealed == pytest.approx(5, abs=1)  # the stall itself (~100 ms), nothing more
    for (t0, a), (t1, b) in zip(emitted, emitted[1:]):
        assert b.timestamp == a.timestamp + a.samples
        assert t1 >= t0


async def test_driver_returns_when_the_channel_closes_while_idle(autojump_clock):
    send, receive = trio.open_memory_channel(4)
    emitted: list = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sender, send, [])
            await play_out(receive, emitted.append, OpusPlayout(1))
    assert emitted == [] and trio.current_time() < 10  # returned at once, having nothing to play
