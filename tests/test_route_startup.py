"""No caller speech is lost while the far side comes up, under trio's MockClock.

A live source sends recorded telephone speech (or105 + or109, 8 kHz, 16.4 s, with pauses) in
real time from the start; the sink comes up one second later (an Argon side waiting for
`ready`). The route keeps that second, plays it from its first sample, and wins the latency
back by shortening pauses: the recording holds every packet of speech, in order; only whole
packets of pause are left out, never below MIN_PAUSE_MS of any pause; and from 10 s on the
added latency (the sink's histogram) has p99 <= 20 ms.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soxr
import trio

import gateway
from audio_checks import read_wav
from gateway.codecs import plan
from gateway.codecs.formats import OPUS_48K, PCM16_8K, PCM16_48K, AudioFrame
from gateway.endpoint import LATENCY_BUCKETS, Endpoint
from gateway.route import MIN_PAUSE_MS, STARTUP_BUFFER_MS, Route, _dbfs, _open_sink_queue, _Pauses

ASSETS = Path(gateway.__file__).parent / "assets"
RATE = 8000
SPEECH = np.concatenate([read_wav(ASSETS / "or105.wav")[0][:, 0], read_wav(ASSETS / "or109.wav")[0][:, 0]])
UP_AFTER = 1.0  # the sink comes up this long after the source starts sending
QUIET_DBFS = -40.0  # for these checks: a 10 ms block quieter than this is not speech


class SpeechSource(Endpoint):
    """Sends `pcm` (8 kHz mono) in `frame_ms` frames on its own absolute clock from the start;
    with `stall=(at, seconds)` it sends nothing from `at` for `seconds`, then what it owes at
    once (a stalled peer or network)."""

    kind = "speech"
    ingress = PCM16_8K

    def __init__(self, name, pcm, *, frame_ms=20, stall=None):
        super().__init__(name)
        self.pcm, self.frame_ms, self.stall = pcm, frame_ms, stall

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        t0 = trio.current_time()
        size = RATE * self.frame_ms // 1000
        for k in range(math.ceil(len(self.pcm) / size)):
            chunk = np.zeros((size, 1), np.int16)
            piece = self.pcm[k * size : (k + 1) * size]
            chunk[: len(piece), 0] = piece
            due = t0 + k * self.frame_ms / 1000
            if self.stall is not None and self.stall[0] <= due - t0 < self.stall[0] + self.stall[1]:
                due = t0 + self.stall[0] + self.stall[1]
            await trio.sleep_until(due)
            emit(AudioFrame(chunk, RATE, k * size))


class LateSink(Endpoint):
    """A sink that is up `up_after` seconds after it starts; records (time, pcm) of each send."""

    kind = "sink"

    def __init__(self, name, fmt=PCM16_8K, ptime_ms=20, up_after=UP_AFTER):
        super().__init__(name)
        self.egress, self.ptime_ms, self.up_after = fmt, ptime_ms, up_after
        self.sent: list[tuple[float, np.ndarray]] = []

    async def run(self, emit, *, task_status=trio.TASK_STATUS_IGNORED):
        await trio.sleep(self.up_after)
        task_status.started()
        await trio.sleep_forever()

    async def send(self, frame):
        self.sent.append((trio.current_time(), frame.pcm[:, 0].copy()))


async def run_call(source, sink, *, snapshot_at):
    """Run the route to its end; returns the sink's latency histogram counts from `snapshot_at`
    (seconds after the start) on."""
    route = Route("call", [source, sink])
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(route.run)
        await trio.sleep_until(t0 + snapshot_at)
        before = list(sink.stats.latency.counts)
    assert route.stats.ended_by == "speech: ended"
    return [a - b for a, b in zip(sink.stats.latency.counts, before)]


def p99_within(counts, bound_s):
    """True when at least 99 % of the observations in `counts` are <= bound_s."""
    within = sum(c for c, upper in zip(counts, LATENCY_BUCKETS) if upper <= bound_s + 1e-12)
    return sum(counts) > 0 and within >= 0.99 * sum(counts)


def reference_packets(pcm, fmt, ptime_ms, frame_ms=20):
    """The source's audio as the sink's pacer packs it: through the same chain (decode,
    resample), cut into packets of ptime_ms (the route's packets line up with these)."""
    chain = plan(PCM16_8K, fmt.as_pcm())
    size = RATE * frame_ms // 1000
    out = []
    for k in range(math.ceil(len(pcm) / size)):
        chunk = np.zeros((size, 1), np.int16)
        piece = pcm[k * size : (k + 1) * size]
        chunk[: len(piece), 0] = piece
        out += [f.pcm[:, 0] for f in chain.process(AudioFrame(chunk, RATE, k * size))]
    out += [f.pcm[:, 0] for f in chain.flush()]
    n = fmt.rate * ptime_ms // 1000
    stream = np.concatenate(out)
    stream = np.concatenate([stream, np.zeros(-len(stream) % n, np.int16)])  # the last one padded
    return [stream[i : i + n] for i in range(0, len(stream), n)]


def match(sent, ref):
    """Map each sent packet to the index of the reference packet it is (in order), or None for
    silence the route inserted (a concealed slot, silence while the source was idle)."""
    where: dict[bytes, list[int]] = {}
    for i, pcm in enumerate(ref):
        where.setdefault(pcm.tobytes(), []).append(i)
    j, mapping = 0, []
    for pcm in sent:
        if not pcm.any() and (j >= len(ref) or ref[j].any()):
            mapping.append(None)
            continue
        later = [i for i in where.get(pcm.tobytes(), []) if i >= j]
        assert later, f"packet {len(mapping)} is not the source's audio"
        mapping.append(later[0])
        j = later[0] + 1
    return mapping


def block_levels(pcm, rate):
    """dBFS of each 10 ms block."""
    x = pcm.astype(np.float64)
    block = rate // 100
    blocks = x[: len(x) // block * block].reshape(-1, block)
    return 10 * np.log10(np.mean(blocks**2, axis=1) / 32768.0**2 + 1e-20)


def is_speech(pcm, rate, quiet_dbfs=QUIET_DBFS):
    return bool((block_levels(pcm, rate) >= quiet_dbfs).any())


def speech_blocks_found(reference, ref_rate, received, rate, block_s=0.25, before_s=1.5, after_s=0.5):
    """Correlation of each speech block of the reference with the received audio, each at its
    best lag within [-before_s, +after_s] of its own position (tests/audio_checks.py's
    block-wise check, with room for the whole start-up backlog won back in pauses and for
    silence inserted during a stall); and the matched positions, which must be in order."""
    ref = soxr.resample(reference.astype(np.float64), ref_rate, rate, quality="VHQ") if ref_rate != rate else reference.astype(np.float64)
    block, before, after = int(block_s * rate), int(before_s * rate), int(after_s * rate)
    # silence before the recording: a block whose leading pause was shortened may start "before" it
    got = np.concatenate([np.zeros(before), received.astype(np.float64)])
    threshold = 0.3 * np.sqrt(np.mean(ref**2))  # speech, not breath or room noise
    scores, positions = [], []
    for start in range(0, len(ref) - block + 1, block):
        a = ref[start : start + block]
        if np.sqrt(np.mean(a**2)) < threshold:
            continue
        lo = start  # = start - before in the recording, which `got` starts `before` early
        window = got[lo : start + before + after + block]
        size = 1 << (len(window) + block).bit_length()
        dots = np.fft.irfft(np.fft.rfft(window, size) * np.conj(np.fft.rfft(a, size)), size)[: len(window) - block + 1]
        energy = np.concatenate([[0.0], np.cumsum(window**2)])
        # (where the window is silence, FFT rounding is all there is: no match there)
        energies = np.maximum(energy[block:] - energy[:-block], 1e-6 * np.dot(a, a))
        corr = dots / np.sqrt(energies * np.dot(a, a))
        best = int(np.argmax(corr))
        scores.append(float(corr[best]))
        positions.append(lo + best)
    return scores, positions


def check_call(source, sink, counts_after, *, stall=None, clean=None, quiet_dbfs=QUIET_DBFS):
    """Every check of one call: nothing of the speech lost, pauses shortened but never below
    MIN_PAUSE_MS, the latency histogram after the snapshot back under 20 ms (p99).

    With background noise in the source, `clean` is the speech without it: a packet is speech
    when the clean one has a 10 ms block of `quiet_dbfs` or louder."""
    fmt, ptime_ms = sink.egress, sink.ptime_ms
    ptime = ptime_ms / 1000
    sent = [pcm for _, pcm in sink.sent]
    ref = reference_packets(source.pcm, fmt, ptime_ms)
    speech = [is_speech(p, fmt.rate, quiet_dbfs) for p in (ref if clean is None else reference_packets(clean, fmt, ptime_ms))]
    mapping = match(sent, ref)
    played = {j for j in mapping if j is not None}
    skipped = [j for j in range(max(played) + 1) if j not in played]

    # the first packet is the first audio, out the moment the sink is up
    assert mapping[0] == 0 and sink.sent[0][0] == pytest.approx(sink.up_after)
    # (a) no speech lost: every packet with speech in it was played, in order; only pauses left out
    assert max(played) >= len(ref) - 1  # to the end of the speech
    assert not [j for j in skipped if speech[j]]
    assert sink.stats.dropped == 0
    received = np.concatenate(sent)
    scores, positions = speech_blocks_found(source.pcm, RATE, received, fmt.rate)
    assert len(scores) >= 20 and min(scores) >= 0.9, np.round(scores, 2)
    assert positions == sorted(positions)
    if clean is None:  # total speech duration: 10 ms blocks of speech, sent and in the source
        speech_s = (block_levels(np.concatenate(ref), fmt.rate) >= quiet_dbfs).sum() / 100
        assert (block_levels(received, fmt.rate) >= quiet_dbfs).sum() / 100 == pytest.approx(speech_s, abs=0.02)

    # (c) pauses shortened, never below MIN_PAUSE_MS: per pause of the source (a run of
    # packets without speech), what was played of it
    runs, start = [], None
    for j, loud in enumerate(speech + [True]):
        if not loud and start is None:
            start = j
        elif loud and start is not None:
            runs.append(range(start, j))
            start = None
    shortened = 0
    for run in runs:
        kept = sum(j in played for j in run)
        assert kept * ptime_ms >= min(len(run) * ptime_ms, MIN_PAUSE_MS), (run, kept)
        shortened += kept < len(run)
    assert shortened >= 2
    won_back = len(skipped) * ptime  # the start-up second (and a stall's backlog) won back
    owed = sink.up_after + (stall[1] if stall else 0)
    # all of it but less than one packet (or one source frame), which the clock shift takes
    assert owed - 2 * ptime - 0.021 <= won_back <= owed + 1e-9
    assert sink.stats.skipped == len(skipped)

    # (b) the added latency after the snapshot: p99 <= 20 ms
    assert p99_within(counts_after, 0.020), counts_after


@pytest.mark.parametrize("fmt, ptime_ms", [(PCM16_8K, 20), (PCM16_48K, 20), (PCM16_8K, 40), (PCM16_48K, 60)],
                         ids=["8k-20ms", "48k-20ms", "8k-40ms", "48k-60ms"])
async def test_startup_backlog_is_played_whole_and_won_back_in_pauses(autojump_clock, fmt, ptime_ms):
    source, sink = SpeechSource("speech", SPEECH), LateSink("sink", fmt, ptime_ms)
    counts = await run_call(source, sink, snapshot_at=10.0)
    check_call(source, sink, counts)
    assert sink.stats.late == 0


@pytest.mark.parametrize("background_dbfs", [-45, -40])
async def test_with_background_noise(autojump_clock, background_dbfs):
    """The same call on a noisy line (pink-ish noise; at -40 dBFS about 14 dB below the active
    speech level): the pauses are still found, and no packet where the speech stands 6 dB
    over the background is left out."""
    pcm = np.clip(np.rint(SPEECH + noise(len(SPEECH), background_dbfs)), -32768, 32767).astype(np.int16)
    source, sink = SpeechSource("speech", pcm), LateSink("sink")
    counts = await run_call(source, sink, snapshot_at=10.0)
    check_call(source, sink, counts, clean=SPEECH, quiet_dbfs=max(QUIET_DBFS, background_dbfs + 6))


class OpusSink(LateSink):
    """A sink that takes Opus (48 kHz, 20 ms packets, as Argon does); records the payloads."""

    async def send(self, frame):
        self.sent.append((trio.current_time(), frame.payload))


async def test_opus_sink(autojump_clock):
    """The same through the Opus encoder: the decoded recording holds the speech, block by
    block; a second of pauses was skipped; the latency is back under 20 ms."""
    import opuslib

    source, sink = SpeechSource("speech", SPEECH), OpusSink("sink", OPUS_48K, 20)
    counts = await run_call(source, sink, snapshot_at=10.0)
    decoder = opuslib.Decoder(48000, 1)
    received = np.concatenate([np.frombuffer(decoder.decode(p, 5760), "<i2") for _, p in sink.sent])
    scores, positions = speech_blocks_found(SPEECH, RATE, received, 48000)
    assert len(scores) >= 20 and min(scores) >= 0.9, np.round(scores, 2)
    assert positions == sorted(positions)
    assert sink.sent[0][0] == pytest.approx(UP_AFTER) and sink.stats.dropped == 0 and sink.stats.late == 0
    assert 1.0 - 0.04 - 0.021 <= sink.stats.skipped * 0.02 <= 1.0
    # all of it less the pauses skipped (and plus the last packet's padding)
    assert len(received) / 48000 == pytest.approx(len(SPEECH) / RATE - sink.stats.skipped * 0.02, abs=0.045)
    assert p99_within(counts, 0.020), counts


async def test_a_stalled_source_is_absorbed_the_same_way(autojump_clock):
    """The source sends nothing for 300 ms in the middle of speech, then all it owes at once:
    silence fills the gap, every sample of the backlog plays, and the pauses after it win the
    latency back."""
    stall = (10.0, 0.3)
    source, sink = SpeechSource("speech", SPEECH, stall=stall), LateSink("sink")
    counts = await run_call(source, sink, snapshot_at=14.0)
    check_call(source, sink, counts, stall=stall)
    assert sink.stats.late >= 1  # the stall was concealed (then the source was idle)


async def test_10ms_frames_fill_the_queue_by_duration(autojump_clock):
    """1 s of 10 ms frames (100 frames) waits in the sink's queue for the sink to come up."""
    source, sink = SpeechSource("speech", SPEECH, frame_ms=10), LateSink("sink")
    counts = await run_call(source, sink, snapshot_at=10.0)
    check_call(source, sink, counts)


def test_sink_queue_is_bounded_by_duration():
    send, recv = _open_sink_queue(STARTUP_BUFFER_MS)
    ten_ms = AudioFrame(np.zeros((80, 1), np.int16), RATE, 0)
    for _ in range(STARTUP_BUFFER_MS // 10):  # 500 frames of 10 ms fit...
        send.send_nowait((0, ten_ms))
    with pytest.raises(trio.WouldBlock):  # ...one more does not (the emitter drops it)
        send.send_nowait((0, ten_ms))
    send.send_nowait((0, None))  # the end-of-stream marker always fits
    assert recv.receive_nowait() == (0, ten_ms)
    send.send_nowait((0, AudioFrame(np.zeros((48, 1), np.int16), 48000, 0)))  # 1 ms fits again
    sixty = AudioFrame(np.zeros((2880, 1), np.int16), 48000, 0)
    with pytest.raises(trio.WouldBlock):
        send.send_nowait((0, sixty))
    recv.close()
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait((0, ten_ms))


# ---------------------------------------------------------------------------------------
# the pause detector on its own


def noise(n, dbfs, seed=1):
    """Pink-ish background noise (1/f power) at `dbfs` RMS."""
    white = np.random.default_rng(seed).standard_normal(n)
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum))
    f[0] = 1
    x = np.fft.irfft(spectrum / np.sqrt(f), n)
    return x / np.sqrt(np.mean(x**2)) * 32768 * 10 ** (dbfs / 20)


def classify(x, rate, ptime_ms=20):
    n = rate * ptime_ms // 1000
    pauses = _Pauses(ptime_ms)
    packets = np.clip(np.rint(x[: len(x) // n * n]), -32768, 32767).astype(np.int16).reshape(-1, n, 1)
    return np.array([pauses.observe(_dbfs(p)) for p in packets])


@pytest.mark.parametrize("background_dbfs", [None, -45, -38], ids=["as-recorded", "noise-45", "noise-38"])
def test_pause_detector_on_telephone_speech(background_dbfs):
    """8 kHz speech as recorded (a -51 dBFS floor) and with background noise: the long pauses
    are found, and no packet where the speech stands clear of the background is called a
    pause."""
    clean = SPEECH.astype(np.float64)
    x = clean if background_dbfs is None else clean + noise(len(clean), background_dbfs)
    pause = classify(x, RATE)
    n = RATE // 50
    clean_level = np.array([_dbfs(p) for p in clean[: len(pause) * n].astype(np.int16).reshape(-1, n, 1)])
    floor = -51 if background_dbfs is None else max(-51, background_dbfs)
    assert not (pause & (clean_level > floor + 10)).any()  # speech 10 dB over the background
    # pauses: 300 ms or more of the recording at its floor (after the first 3 s, once the
    # background estimate has risen to a noisy line's level)
    silent = np.convolve(clean_level < -49, np.ones(15), "same") >= 15
    found = pause[150:][silent[150:]].mean()
    assert found >= (0.95 if background_dbfs is None else 0.6), found


def test_pause_detector_on_clean_48k_speech():
    """Clean 48 kHz speech (16 kHz recording, upsampled): its pauses are quieter than the floor."""
    speech16k, rate = read_wav(ASSETS / "speech16k.wav")
    x = soxr.resample(speech16k[:, 0].astype(np.float64), rate, 48000)
    x = np.concatenate([np.zeros(48000), x, np.zeros(48000), x])  # with pauses of 1 s
    pause = classify(x, 48000)
    levels = np.array([_dbfs(p) for p in np.clip(np.rint(x), -32768, 32767).astype(np.int16)[: len(pause) * 960].reshape(-1, 960, 1)])
    assert pause[levels < -60].all()  # silence and breath-quiet packets are pauses
    assert not pause[levels > -45].any()  # speech is not
