"""FileSource and Recorder: what a user hears from a file and finds in a recording.

References are read with the stdlib `wave` module, independently of PyAV, which the code
under test uses. Pacing runs under trio's `autojump_clock` (a MockClock): no real sleeping.
"""

from __future__ import annotations

import math
import os
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soxr
import trio

import gateway
from gateway.adapters.local import FileSource, MediaFileError, Recorder
from gateway.codecs.formats import OPUS_48K, AudioFormat, AudioFrame, EncodedFrame, Encoding
from gateway.errors import ConfigError, LocalProtocolError

ASSETS = Path(gateway.__file__).parent / "assets"
OR105 = ASSETS / "or105.wav"  # 8 kHz mono speech, 67220 samples = 8.4025 s
STEREO = ASSETS / "stereo48k.wav"  # 48 kHz stereo, a different tone on each channel


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """int16 (samples, channels) and rate, read with the stdlib (not PyAV)."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.reshape(-1, w.getnchannels()), w.getframerate()


def read_any(path: Path) -> tuple[np.ndarray, int, list[int]]:
    """Decode a whole file with PyAV: int16 (samples, channels), rate, and each decoded
    frame's pts in samples (to check the container's timestamps)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        channels = stream.channels
        chunks, pts = [], []
        for frame in container.decode(stream):
            assert frame.format.name in ("s16", "s16p", "flt", "fltp")
            pts.append(int(frame.pts * frame.time_base * frame.sample_rate))
            array = frame.to_ndarray()
            if frame.format.is_planar:
                array = array.T  # (channels, samples) -> (samples, channels)
            else:
                array = array.reshape(-1, channels)
            if array.dtype != np.int16:
                array = np.clip(np.rint(array * 32768), -32768, 32767).astype(np.int16)
            chunks.append(array)
            rate = frame.sample_rate
        return np.concatenate(chunks), rate, pts


def peak_hz(x: np.ndarray, rate: int) -> float:
    """Frequency of the strongest FFT bin of a 1-D signal, in Hz."""
    x = x.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def sine(freq: float, rate: int, start: int, n: int, amplitude: float = 10000) -> np.ndarray:
    return np.rint(amplitude * np.sin(2 * np.pi * freq * (np.arange(start, start + n)) / rate)).astype(np.int16)


async def play(source: FileSource, seconds: float | None = None, clock=None, stall=None):
    """Run `source` (until it returns, or for `seconds`); return [(time since start, frame)]
    and the time `run` took. `stall(k)` gives seconds of mock time the consumer burns on
    frame k (simulating slow work in the route), jumped on `clock`."""
    got: list[tuple[float, AudioFrame]] = []
    t0 = trio.current_time()

    def emit(frame):
        got.append((trio.current_time() - t0, frame))
        if stall is not None:
            clock.jump(stall(len(got) - 1))

    if seconds is None:
        await source.run(emit)
    else:
        with trio.move_on_after(seconds):
            await source.run(emit)
    return got, trio.current_time() - t0


def pcm_of(got) -> np.ndarray:
    return np.concatenate([frame.pcm for _, frame in got])


# ---------------------------------------------------------------------------------------
# FileSource


async def test_file_source_native_rate_is_bit_exact_and_paced(autojump_clock):
    ref, ref_rate = read_wav(OR105)
    assert (ref_rate, ref.shape) == (8000, (67220, 1))
    source = FileSource("prompt", OR105, rate=8000)
    assert source.ingress == AudioFormat(Encoding.PCM16, 8000, 1) and source.egress is None

    # the consumer burns 7 ms of clock on every frame: relative sleeps would drift 2.9 s
    got, took = await play(source, clock=autojump_clock, stall=lambda k: 0.007)

    n = math.ceil(8.4025 / 0.020)
    assert len(got) == n == 421
    for k, (t, frame) in enumerate(got):
        assert frame.pcm.shape == (160, 1) and frame.pcm.dtype == np.int16
        assert frame.rate == 8000
        assert frame.timestamp == k * 160
        assert t == pytest.approx(k * 0.020, abs=1e-9)
    # run returns when the last frame's 20 ms are over: the file's duration, padded up
    assert took == pytest.approx(n * 0.020, abs=1e-9)
    # content: the file's samples, then silence to the end of the last frame
    out = pcm_of(got)
    np.testing.assert_array_equal(out[: len(ref)], ref)
    assert not out[len(ref) :].any() and len(out) - len(ref) == 421 * 160 - 67220
    assert source.stats.frames_in == 421 and source.stats.bytes_in == 421 * 160 * 2


async def test_file_source_catches_up_after_a_stall_instead_of_drifting(autojump_clock):
    source = FileSource("prompt", OR105, rate=8000)
    # one 50 ms hiccup while handling frame 10
    got, _ = await play(source, clock=autojump_clock, stall=lambda k: 0.050 if k == 10 else 0)
    times = [t for t, _ in got]
    assert times[10] == pytest.approx(0.200)
    # frames 11 and 12 are already due at 0.250: sent at once, then back on the grid
    assert times[11] == pytest.approx(0.250) and times[12] == pytest.approx(0.250)
    for k in range(13, len(got)):
        assert times[k] == pytest.approx(k * 0.020, abs=1e-9)
    assert len(got) == 421


async def test_file_source_moves_its_clock_after_a_long_stall_instead_of_bursting(autojump_clock):
    """A stall of more than 2 ptimes (a starved event loop) would make a catch-up burst that
    the route drops as excess latency: the file's clock moves later instead, and every frame
    still plays, one per 20 ms."""
    source = FileSource("prompt", OR105, rate=8000)
    got, took = await play(source, clock=autojump_clock, stall=lambda k: 0.200 if k == 10 else 0)
    times = [t for t, _ in got]
    assert len(got) == 421 and [f.timestamp for _, f in got] == [k * 160 for k in range(421)]
    assert times[11] == pytest.approx(0.400)  # at once after the stall, then on the moved grid
    for k in range(11, len(got)):
        assert times[k] == pytest.approx(0.400 + (k - 11) * 0.020, abs=1e-9)
    assert took == pytest.approx(421 * 0.020 + 0.180, abs=1e-9)


async def test_file_source_upsamples_to_48k(autojump_clock):
    ref, _ = read_wav(OR105)
    source = FileSource("prompt", OR105)  # rate 48000 by default
    got, took = await play(source)
    assert len(got) == 421  # ceil(8.4025 s / 20 ms)
    for k, (t, frame) in enumerate(got):
        assert frame.pcm.shape == (960, 1) and frame.rate == 48000
        assert frame.timestamp == k * 960
        assert t == pytest.approx(k * 0.020, abs=1e-9)
    assert took == pytest.approx(421 * 0.020, abs=1e-9)

    out = pcm_of(got)[:, 0].astype(np.float64)
    expected = soxr.resample(ref[:, 0].astype(np.float64), 8000, 48000)  # 403320 samples
    assert len(expected) == 6 * 67220
    body = out[: len(expected)]
    corr = np.dot(body, expected) / np.sqrt(np.dot(body, body) * np.dot(expected, expected))
    assert corr > 0.95
    assert np.sqrt(np.mean(body**2)) == pytest.approx(np.sqrt(np.mean(expected**2)), rel=0.05)
    assert not out[len(expected) :].any()  # padding is silence


async def test_file_source_other_ptime_and_rate(autojump_clock):
    source = FileSource("prompt", OR105, rate=16000, ptime_ms=40)
    got, took = await play(source)
    assert len(got) == math.ceil(8.4025 / 0.040) == 211
    assert all(frame.pcm.shape == (640, 1) for _, frame in got)
    assert [frame.timestamp for _, frame in got] == [k * 640 for k in range(211)]
    assert [t for t, _ in got] == pytest.approx([k * 0.040 for k in range(211)], abs=1e-9)
    assert took == pytest.approx(211 * 0.040)


async def test_file_source_stereo_keeps_channels_apart(autojump_clock):
    ref, rate = read_wav(STEREO)
    assert (rate, ref.shape[1]) == (48000, 2)
    left_hz, right_hz = peak_hz(ref[:, 0], rate), peak_hz(ref[:, 1], rate)
    assert abs(left_hz - right_hz) > 50  # the asset has a different tone per channel

    got, _ = await play(FileSource("music", STEREO, channels=2))
    assert len(got) == math.ceil(len(ref) / 960)
    assert all(frame.pcm.shape == (960, 2) for _, frame in got)
    out = pcm_of(got)[: len(ref)]
    assert peak_hz(out[:, 0], rate) == pytest.approx(left_hz, abs=1)
    assert peak_hz(out[:, 1], rate) == pytest.approx(right_hz, abs=1)
    np.testing.assert_array_equal(out, ref)  # same rate and layout: untouched


async def test_file_source_mono_downmixes_both_channels(autojump_clock):
    ref, rate = read_wav(STEREO)
    got, _ = await play(FileSource("music", STEREO, channels=1))
    out = pcm_of(got)[: len(ref), 0].astype(np.float64)
    assert all(frame.pcm.shape == (960, 1) for _, frame in got)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    for ch in (0, 1):
        tone = round(peak_hz(ref[:, ch], rate) * len(out) / rate)
        assert spectrum[tone - 2 : tone + 3].max() > 0.3 * spectrum.max()  # both tones present
    mix = ref.astype(np.float64).sum(axis=1)
    assert np.dot(out, mix) / np.sqrt(np.dot(out, out) * np.dot(mix, mix)) > 0.99


async def test_file_source_loop_is_seamless(autojump_clock):
    ref, _ = read_wav(OR105)
    duration = len(ref) / 8000
    source = FileSource("hold-music", OR105, rate=8000, loop=True)
    got, took = await play(source, seconds=2 * duration)  # cancelled, like a route stop
    assert took == pytest.approx(2 * duration)
    # frames at 0, 20 ms, ... up to the cancel: 841 frames, no end-of-file stop or pause
    assert len(got) == math.floor(2 * duration / 0.020) + 1 == 841
    assert [frame.timestamp for _, frame in got] == [k * 160 for k in range(len(got))]
    assert [t for t, _ in got] == pytest.approx([k * 0.020 for k in range(len(got))], abs=1e-9)
    # the second pass starts right after the last sample of the first: no padding, no gap
    out = pcm_of(got)
    np.testing.assert_array_equal(out, np.tile(ref, (3, 1))[: len(out)])


async def test_a_prepared_file_plays_from_memory_exactly_as_decoded(autojump_clock, tmp_path, monkeypatch):
    """`prepare` decodes the file once (the cache); sessions after it replay the very samples,
    loops seamless as before, and never open the file again. A changed file is decoded anew."""
    import gateway.adapters.local as local
    from gateway.quality import write_wav

    path = tmp_path / "hold.wav"
    ref, _ = read_wav(OR105)
    write_wav(path, ref, 8000)
    duration = len(ref) / 8000
    source = FileSource("hold-music", path, rate=8000, loop=True)
    await source.prepare()
    opened = []
    monkeypatch.setattr(FileSource, "_open", lambda self: opened.append(1) or (_ for _ in ()).throw(AssertionError("opened")))
    got, _ = await play(source, seconds=2 * duration)
    assert not opened
    out = pcm_of(got)
    np.testing.assert_array_equal(out, np.tile(ref, (3, 1))[: len(out)])
    assert [frame.timestamp for _, frame in got] == [k * 160 for k in range(len(got))]
    monkeypatch.undo()
    write_wav(path, ref[: len(ref) // 2], 8000)  # the file changed: its size and mtime differ
    os.utime(path, ns=(1, 1))
    assert local._DECODED.get(source._cache_key()) is None
    short, _ = await play(FileSource("hold-music", path, rate=8000))
    assert len(pcm_of(short)) == math.ceil(len(ref) // 2 / 160) * 160


async def test_file_source_gain(autojump_clock):
    ref, _ = read_wav(OR105)
    quiet, _ = await play(FileSource("p", OR105, rate=8000, gain_db=20 * math.log10(0.5)))
    half = pcm_of(quiet)[: len(ref)].astype(np.int32)
    assert np.abs(half - ref.astype(np.int32) / 2).max() <= 0.5 + 1e-6

    loud, _ = await play(FileSource("p", OR105, rate=8000, gain_db=40))
    boosted = pcm_of(loud)[: len(ref)]
    assert boosted.max() == 32767 and boosted.min() == -32768  # saturates
    nonzero = ref != 0
    assert (np.sign(boosted[nonzero]) == np.sign(ref[nonzero])).all()  # never wraps around


def write_with_pyav(path: Path, codec: str, pcm: np.ndarray, rate: int) -> None:
    """A FLAC/MP3 file made by FFmpeg itself, for FileSource to read."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("kind", ["flac", "mp3", "ogg"])
async def test_file_source_reads_compressed_files(autojump_clock, tmp_path, kind):
    tone = sine(440, 48000, 0, 48000)  # 1 s
    path = tmp_path / f"tone.{kind}"
    if kind == "ogg":
        recorder = Recorder("rec", path)
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run, None)
            for k in range(50):
                await recorder.send(AudioFrame(tone[k * 960 : (k + 1) * 960, None], 48000, k * 960))
            nursery.cancel_scope.cancel()
    else:
        write_with_pyav(path, "flac" if kind == "flac" else "libmp3lame", tone, 48000)

    got, took = await play(FileSource("tone", path, rate=16000))
    out = pcm_of(got)[:, 0]
    assert all(frame.pcm.shape == (320, 1) for _, frame in got)
    # 1 s of audio; MP3 adds up to a couple of its 1152-sample frames of encoder delay
    assert abs(len(got) - 50) <= (3 if kind == "mp3" else 0)
    assert took == pytest.approx(len(got) * 0.020)
    assert peak_hz(out, 16000) == pytest.approx(440, abs=2)
    if kind == "flac":  # lossless: equal to soxr's downsample of the tone, near enough
        expected = soxr.resample(tone.astype(np.float64), 48000, 16000)
        assert np.abs(out[: len(expected)] - expected).max() < 200


async def test_file_source_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "prompts" / "welcome.wav"
    source = FileSource("prompt", missing)
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileNotFoundError, match="welcome.wav") as info:
            await nursery.start(source.run, lambda frame: None)  # fails before started()
    assert info.value.filename == str(missing)
    assert source.stats.frames_in == 0


async def test_file_source_not_audio_names_the_path(tmp_path):
    bogus = tmp_path / "notes.wav"
    bogus.write_text("this is not audio\n" * 10)
    async with trio.open_nursery() as nursery:
        with pytest.raises(MediaFileError, match="notes.wav"):
            await nursery.start(FileSource("prompt", bogus).run, lambda frame: None)


# ---------------------------------------------------------------------------------------
# Recorder


async def record(recorder: Recorder, frames: list[AudioFrame]) -> None:
    """Open the recorder, send the frames, then cancel its run like a stopping route."""
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run, lambda frame: None)
        for frame in frames:
            await recorder.send(frame)
            await trio.sleep(0.020)
        nursery.cancel_scope.cancel()


def tone_frames(rate: int, channels: int, seconds: float, ptime_ms: int = 20) -> tuple[list[AudioFrame], np.ndarray]:
    """440 Hz on the left (or only) channel, 660 Hz on the right; frames and the whole."""
    n = rate * ptime_ms // 1000
    total = round(seconds * rate)
    whole = np.stack([sine(440, rate, 0, total), sine(660, rate, 0, total)][:channels], axis=1)
    frames = [AudioFrame(np.ascontiguousarray(whole[i : i + n]), rate, i) for i in range(0, total, n)]
    return frames, whole


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [48000, 16000, 8000])
async def test_recorder_wav(autojump_clock, tmp_path, channels, rate):
    path = tmp_path / "calls" / "2024" / "call.wav"  # parents are created
    recorder = Recorder("rec", path, rate=rate, channels=channels)
    assert recorder.egress == AudioFormat(Encoding.PCM16, rate, channels) and recorder.ingress is None
    frames, whole = tone_frames(rate, channels, 2.0)
    await record(recorder, frames)

    assert recorder.duration_s == pytest.approx(2.0)
    assert recorder.stats.frames_out == 100 and recorder.stats.bytes_out == whole.nbytes
    # the header is right (stdlib reader trusts the sizes), and the content is bit-exact
    data, file_rate = read_wav(path)
    assert file_rate == rate and data.shape == (2 * rate, channels)
    np.testing.assert_array_equal(data, whole)
    # and FFmpeg agrees
    decoded, file_rate, _ = read_any(path)
    assert file_rate == rate and decoded.shape == (2 * rate, channels)
    assert peak_hz(decoded[:, 0], rate) == pytest.approx(440, abs=1)
    if channels == 2:
        assert peak_hz(decoded[:, 1], rate) == pytest.approx(660, abs=1)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("name", "rate"), [("call.ogg", 48000), ("call.opus", 48000), ("call.ogg", 16000)])
async def test_recorder_ogg_opus(autojump_clock, tmp_path, name, rate, channels):
    path = tmp_path / name
    recorder = Recorder("rec", path, rate=rate, channels=channels)
    frames, _ = tone_frames(rate, channels, 2.0)
    await record(recorder, frames)
    assert recorder.duration_s == pytest.approx(2.0)
    assert recorder.stats.frames_out == 100

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert container.format.name == "ogg" and stream.codec_context.name == "opus"
        assert stream.channels == channels
    decoded, file_rate, pts = read_any(path)
    assert file_rate == 48000  # Opus always decodes at 48 kHz
    assert decoded.shape[1] == channels
    assert abs(len(decoded) - 96000) <= 48 * 5  # 2 s within 5 ms
    # the page granule positions make the decoded timeline contiguous from 0
    lengths = np.diff(pts + [len(decoded)])
    assert pts[0] == 0 and (lengths > 0).all() and sum(lengths) == len(decoded)
    steady = decoded[4800:-4800]  # skip the codec's start-up and the end
    assert peak_hz(steady[:, 0], 48000) == pytest.approx(440, abs=1)
    if channels == 2:
        assert peak_hz(steady[:, 1], 48000) == pytest.approx(660, abs=1)
    # lossy, but loud and clean: the level of a 10000-peak sine within 1 dB
    rms = np.sqrt(np.mean(steady[:, 0].astype(np.float64) ** 2))
    assert 20 * math.log10(rms / (10000 / math.sqrt(2))) == pytest.approx(0, abs=1)


async def test_recorder_explicit_format_overrides_extension(autojump_clock, tmp_path):
    path = tmp_path / "call.rec"
    recorder = Recorder.from_config("rec", {"path": str(path), "format": "ogg"})
    frames, _ = tone_frames(48000, 1, 0.5)
    await record(recorder, frames)
    with av.open(str(path)) as container:
        assert container.format.name == "ogg"
        assert container.streams.audio[0].codec_context.name == "opus"


async def test_recorder_cancelled_before_any_audio_leaves_a_valid_file(autojump_clock, tmp_path):
    path = tmp_path / "empty.wav"
    recorder = Recorder("rec", path, rate=8000)
    await record(recorder, [])
    data, rate = read_wav(path)
    assert rate == 8000 and data.shape == (0, 1)
    assert recorder.duration_s == 0

    ogg = tmp_path / "empty.ogg"
    await record(Recorder("rec", ogg), [])
    head = ogg.read_bytes()
    assert head.startswith(b"OggS") and b"OpusHead" in head and b"OpusTags" in head


@pytest.mark.parametrize("suffix", [".wav", ".ogg"])
async def test_a_session_that_recorded_nothing_leaves_its_name_to_the_next(autojump_clock, tmp_path, suffix):
    """A route's sessions record to NAME, NAME-2, ...; one that recorded nothing (a dial
    refused before any audio, restarted) leaves no file and the next session takes its name,
    so an hour of failed restarts leaves no trail of empty files and the names stay
    consecutive. The first session's file stays even when empty (a valid, playable file)."""
    path = tmp_path / f"call{suffix}"
    recorder = Recorder("rec", path, rate=8000)
    first, _ = tone_frames(8000, 1, 0.2)
    third, _ = tone_frames(8000, 1, 0.4)
    await record(recorder, [])  # refused: nothing
    await record(recorder, first)  # the first call: call.*, over the empty one
    await record(recorder, [])  # refused again
    await record(recorder, [])
    await record(recorder, third)  # the second call: call-2.*
    await record(recorder, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"call-2{suffix}", f"call{suffix}"]
    assert recorder.sessions == 2
    durations = []
    for name in (f"call{suffix}", f"call-2{suffix}"):
        with av.open(str(tmp_path / name)) as container:
            samples = sum(f.samples for f in container.decode(audio=0))
            durations.append(samples / container.streams.audio[0].rate)
    assert durations == [pytest.approx(0.2, abs=0.03), pytest.approx(0.4, abs=0.03)], durations


async def test_recorder_drops_frames_when_not_open_and_rejects_wrong_frames(autojump_clock, tmp_path):
    path = tmp_path / "call.wav"
    recorder = Recorder("rec", path, rate=8000)
    early = AudioFrame(sine(440, 8000, 0, 160)[:, None], 8000, 0)
    await recorder.send(early)  # before run(): nothing to write to
    assert recorder.stats.dropped == 1 and not path.exists()

    frames, whole = tone_frames(8000, 1, 0.2)
    await record(recorder, frames)
    await recorder.send(early)  # after the route stopped
    assert recorder.stats.dropped == 2
    data, _ = read_wav(path)
    np.testing.assert_array_equal(data, whole)  # only what was sent while open

    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run, None)
        with pytest.raises(LocalProtocolError, match="16000 Hz"):
            await recorder.send(AudioFrame(np.zeros((320, 1), np.int16), 16000, 0))
        with pytest.raises(LocalProtocolError, match=r"\(160, 2\)"):
            await recorder.send(AudioFrame(np.zeros((160, 2), np.int16), 8000, 0))
        with pytest.raises(LocalProtocolError, match="EncodedFrame"):
            await recorder.send(EncodedFrame(b"\xf8", OPUS_48K, 960))
        nursery.cancel_scope.cancel()


async def test_recorder_unwritable_path_names_it(tmp_path):
    blocker = tmp_path / "calls"
    blocker.write_text("a file where the directory should be")
    path = blocker / "call.wav"
    recorder = Recorder("rec", path)
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError, match="call.wav"):
            await nursery.start(recorder.run, None)

    taken = tmp_path / "taken.wav"
    taken.mkdir()  # FFmpeg itself fails to create the file: still an OSError naming it
    async with trio.open_nursery() as nursery:
        with pytest.raises(IsADirectoryError, match="taken.wav"):
            await nursery.start(Recorder("rec", taken).run, None)


# ---------------------------------------------------------------------------------------
# configuration


def test_from_config_applies_options(tmp_path):
    source = FileSource.from_config(
        "music", {"path": str(OR105), "loop": True, "rate": 16000, "channels": 2, "ptime_ms": 10, "gain_db": -3}
    )
    assert source.ingress == AudioFormat(Encoding.PCM16, 16000, 2)
    assert (source.loop, source.ptime_ms, source.frame_samples, source.gain_db) == (True, 10, 160, -3.0)
    assert source.path == OR105 and "music" in source.describe() and "or105.wav" in source.describe()

    defaults = FileSource.from_config("p", {"path": str(OR105)})
    assert defaults.ingress == AudioFormat(Encoding.PCM16, 48000, 1)
    assert (defaults.loop, defaults.ptime_ms, defaults.gain_db) == (False, 20, 0.0)

    recorder = Recorder.from_config("rec", {"path": str(tmp_path / "x.opus"), "channels": 2, "ptime_ms": 40})
    assert (recorder.format, recorder.ptime_ms) == ("ogg", 40)
    assert recorder.egress == AudioFormat(Encoding.PCM16, 48000, 2)
    assert Recorder.from_config("rec", {"path": "x.WAV"}).format == "wav"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "path"),
        ({"path": 5}, "path"),
        ({"path": ""}, "path"),
        ({"path": "a.wav", "loop": "yes"}, "loop"),
        ({"path": "a.wav", "loop": 1}, "loop"),
        ({"path": "a.wav", "rate": "48000"}, "rate"),
        ({"path": "a.wav", "rate": 100}, "rate"),
        ({"path": "a.wav", "rate": True}, "rate"),
        ({"path": "a.wav", "channels": 3}, "channels"),
        ({"path": "a.wav", "channels": 1.0}, "channels"),
        ({"path": "a.wav", "ptime_ms": 25}, "ptime_ms"),
        ({"path": "a.wav", "rate": 22050, "ptime_ms": 10}, "ptime_ms"),
        ({"path": "a.wav", "gain_db": "loud"}, "gain_db"),
        ({"path": "a.wav", "gain_db": float("nan")}, "gain_db"),
        ({"path": "a.wav", "gain_db": 200}, "gain_db"),
        ({"path": "a.wav", "volume": 3}, "volume"),
        ({"path": "a.wav", "format": "wav"}, "format"),  # a Recorder option, not a FileSource one
    ],
)
def test_file_source_bad_options(options, key):
    with pytest.raises(ConfigError) as info:
        FileSource.from_config("prompt", options)
    message = str(info.value)
    assert f"'{key}'" in message and "'prompt'" in message


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "path"),
        ({"path": "call.mp3"}, "format"),  # unknown extension: says to set 'format'
        ({"path": "call.wav", "format": "flac"}, "format"),
        ({"path": "call.ogg", "rate": 44100}, "rate"),  # not an Opus rate
        ({"path": "call.wav", "rate": 22050, "ptime_ms": 10}, "ptime_ms"),
        ({"path": "call.wav", "channels": 6}, "channels"),
        ({"path": "call.wav", "loop": True}, "loop"),  # a FileSource option
    ],
)
def test_recorder_bad_options(options, key):
    with pytest.raises(ConfigError) as info:
        Recorder.from_config("rec", options)
    message = str(info.value)
    assert f"'{key}'" in message and "'rec'" in message


def test_options_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        FileSource.from_config("prompt", ["path", "a.wav"])
    with pytest.raises(ConfigError, match="mapping"):
        Recorder.from_config("rec", "call.wav")
