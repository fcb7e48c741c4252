"""Local endpoints: play an audio file into a route, record a route to a file.

`FileSource` (kind "file") decodes any file FFmpeg can read (WAV, MP3, Ogg/Opus, FLAC, ...)
through PyAV, converts it to PCM16 at the configured rate and channel count, and emits
`AudioFrame`s of exactly `ptime_ms`, paced in real time on absolute deadlines.

`Recorder` (kind "record") writes the `AudioFrame`s a route sends it to WAV (pcm_s16le) or
Ogg/Opus (libopus), and always finalizes the file when its `run()` ends, cancelled or not.

Both do their (cheap, synchronous) decoding and encoding in the trio thread: a 20 ms frame
costs microseconds to slice and ~0.1 ms to Opus-encode (DESIGN.md, "Performance model").

Errors:

- `ConfigError` from `from_config()`: unknown key, missing `path`, wrong type or value; the
  message names the endpoint, the key and what was expected (the loader adds file:line).
  The constructors raise `ValueError` with the same message for the same mistakes.
- `OSError` (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, ...) from `run()`
  when the file cannot be opened; `filename` and the message name the path. Raised before
  `task_status.started()`, so `await nursery.start(endpoint.run, emit)` raises it.
- `MediaFileError` (a `GatewayError`) from `FileSource.run()` when the file exists but holds
  no decodable audio (not a media file, no audio stream, corrupt data, zero samples).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from collections.abc import Generator, Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import trio

from gateway.codecs.formats import VALID_PTIMES_MS, AudioFormat, AudioFrame, Encoding, Frame
from gateway.endpoint import Emit, Endpoint
from gateway.errors import ConfigError, GatewayError, LocalProtocolError

__all__ = ["FileSource", "MediaFileError", "Recorder"]

MIN_RATE = 8000  # Hz
MAX_RATE = 192000  # Hz
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # Hz, the input rates libopus accepts
RECORD_FORMATS = ("wav", "ogg")
_EXTENSIONS = {".wav": "wav", ".ogg": "ogg", ".opus": "ogg"}
_LAYOUTS = {1: "mono", 2: "stereo"}


CACHE_MAX_BYTES = 64 * 2**20  # decoded audio kept per process, all files together
CACHE_FILE_MAX_BYTES = 16 * 2**20  # a file that decodes to more (~9 min at 16 kHz mono) streams


class _DecodedAudio:
    """Decoded files by `FileSource._cache_key`, least recently used evicted first, at most
    `CACHE_MAX_BYTES` in all. Arrays are never written to after they are kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[object, ...], np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[object, ...]) -> np.ndarray | None:
        pcm = self._items.get(key)
        if pcm is not None:
            self._items.move_to_end(key)
        return pcm

    def put(self, key: tuple[object, ...], pcm: np.ndarray) -> None:
        if key in self._items or pcm.nbytes > self.max_bytes:
            return
        pcm.setflags(write=False)
        self._items[key] = pcm
        self._bytes += pcm.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes


_DECODED = _DecodedAudio(CACHE_MAX_BYTES)
_DECODING: dict[tuple[object, ...], trio.Event] = {}
"""Files being decoded by a `prepare` now (one decode per file, however many routes start)."""
_STREAMED: set[tuple[object, ...]] = set()
"""Files found too long to keep: they stream, and `prepare` does not try again."""


class MediaFileError(GatewayError):
    """A file exists but holds no audio we can decode (not a media file, no audio stream,
    corrupt data, no samples). The message names the path."""


# ---------------------------------------------------------------------------------------
# option checks: each returns the normalized value or raises ValueError naming the key


def _check_path(value: Any) -> Path:
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str) and value:
        path = Path(value)
    else:
        raise ValueError(f"option 'path' must be a non-empty string (a file path), got {value!r}")
    if "\0" in str(path):
        raise ValueError(f"option 'path' must not contain a NUL byte, got {str(path)!r}")
    return path.expanduser()


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"option {key!r} must be true or false, got {value!r}")
    return value


def _check_rate(value: Any, allowed: tuple[int, ...] | None = None) -> int:
    if allowed is not None:
        if not (isinstance(value, int) and not isinstance(value, bool)) or value not in allowed:
            raise ValueError(f"option 'rate' must be one of {', '.join(map(str, allowed))} (Hz), got {value!r}")
        return value
    if not (isinstance(value, int) and not isinstance(value, bool)) or not MIN_RATE <= value <= MAX_RATE:
        raise ValueError(f"option 'rate' must be an integer sample rate in Hz from {MIN_RATE} to {MAX_RATE}, got {value!r}")
    return value


def _check_channels(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2):
        raise ValueError(f"option 'channels' must be 1 (mono) or 2 (stereo), got {value!r}")
    return value


def _check_ptime(value: Any, rate: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_PTIMES_MS:
        raise ValueError(
            f"option 'ptime_ms' must be one of {', '.join(map(str, VALID_PTIMES_MS))} (milliseconds), got {value!r}"
        )
    if rate * value % 1000:
        raise ValueError(f"option 'ptime_ms' {value} is not a whole number of samples at rate {rate} Hz")
    return value


def _check_gain(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"option 'gain_db' must be a number of decibels, got {value!r}")
    if not -96.0 <= value <= 48.0:
        raise ValueError(f"option 'gain_db' must be between -96 and 48 (dB), got {value!r}")
    return float(value)


def _from_config(cls: type[Endpoint], name: str, options: Any, allowed: tuple[str, ...]) -> Any:
    """Build `cls(name, **options)`, turning every option mistake into a ConfigError."""
    where = f"{cls.kind} endpoint {name!r}"
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: options must be a mapping, got {type(options).__name__}")
    unknown = sorted(str(key) for key in options if key not in allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option {unknown[0]!r} (expected one of: {', '.join(allowed)})"
        )
    if "path" not in options:
        raise ConfigError(f"{where}: option 'path' is required (the audio file)")
    try:
        return cls(name, **options)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _from_options(cls: Any, name: str, opts: Any) -> Any:
    """`cls.from_config(name, values)` from a route's endpoint options (`gateway.config.Options`):
    the registry's constructor of the local kinds. `${...}` references expand here as
    everywhere (the local adapters take plain values); errors gain the file:line and key path."""
    values = {k: opts.get_str(k) if isinstance(opts.raw(k), str) else opts.raw(k)
              for k in list(opts.keys()) if k not in ("name", "role", "hears", "identity")}
    try:
        return cls.from_config(name, values)
    except ConfigError as err:
        raise opts.error(None, str(err)) from None


def _os_error(err: av.FFmpegError | OSError, path: Path) -> OSError:
    """The builtin OSError subclass for a failed open, naming `path` (OSError(errno, ...)
    picks FileNotFoundError, PermissionError, IsADirectoryError... from the errno)."""
    return OSError(err.errno, err.strerror or str(err), str(path))


# ---------------------------------------------------------------------------------------


async def _play_at(start: float, k: int, ptime: float) -> float:
    """Wait for frame k's time `start + k·ptime` and return the (maybe moved) start. A file is
    not live: after a stall of the event loop (more than 2 ptimes late) its clock moves later
    instead of catching up in a burst, which the route would take for excess latency and drop."""
    now = trio.current_time()
    if now > start + (k + 2) * ptime:
        start = now - k * ptime
    await trio.sleep_until(start + k * ptime)
    return start


class FileSource(Endpoint[Frame]):
    """Plays an audio file into a route, in real time.

    Emits `AudioFrame`s with `pcm` of shape (`frame_samples`, `channels`), int16, at `rate`
    Hz; `timestamp` is k * `frame_samples` for the k-th frame (k from 0), continuing across
    loops. Frame k is emitted at `start + k * ptime_ms / 1000` seconds of trio's clock, where
    `start` is `trio.current_time()` right after `task_status.started()`: absolute deadlines,
    so the pace never drifts and MockClock controls it.

    Decoding is lazy: one demuxed packet at a time (a few thousand samples), converted with
    `av.AudioResampler(format="s16", layout=..., rate=rate)`. A file that decodes to at most
    `CACHE_FILE_MAX_BYTES` is decoded once per process (by `prepare`, which a route awaits before
    each session) and replayed from memory by its loops
    and later sessions (`CACHE_MAX_BYTES` in all, least recently used first out; a changed
    file, by size or mtime, is decoded again); a longer one streams, never held in memory.
    Files with more or fewer channels than `channels` are down-/up-mixed by FFmpeg.
    """

    kind = "file"
    egress = None
    local_source = True  # starts on its own: the route starts it once the peers are connected

    def __init__(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        loop: bool = False,
        rate: int = 48000,
        channels: int = 1,
        ptime_ms: int = 20,
        gain_db: float = 0.0,
    ) -> None:
        """Raises ValueError naming the option when a value is invalid (see `from_config`)."""
        super().__init__(name)
        self.path = _check_path(path)
        """The file to play."""
        self.loop = _check_bool("loop", loop)
        """Restart at end of file, seamlessly, until cancelled."""
        self.rate = _check_rate(rate)
        """Output sample rate in Hz."""
        self.channels = _check_channels(channels)
        """Output channels: 1 or 2."""
        self.ptime_ms = _check_ptime(ptime_ms, self.rate)
        self.gain_db = _check_gain(gain_db)
        """Gain applied to every sample, in dB; the result saturates at the int16 bounds."""
        self.ingress = AudioFormat(Encoding.PCM16, self.rate, self.channels)
        self.frame_samples = self.ingress.samples(self.ptime_ms)
        """Samples per channel in each emitted frame."""

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> FileSource:
        """Build from a config mapping with keys `path` (required, str), `loop` (bool, default
        false), `rate` (int Hz, 8000-192000, default 48000), `channels` (1 or 2, default 1),
        `ptime_ms` (10, 20, 40 or 60, default 20) and `gain_db` (number, -96 to 48, default 0).

        Raises ConfigError naming the key and what was expected.
        """
        return _from_config(cls, name, options, ("path", "loop", "rate", "channels", "ptime_ms", "gain_db"))

    @classmethod
    def from_options(cls, name: str, opts: Any, runtime: Any = None) -> FileSource:
        """`from_config` from a route's endpoint options (the registry's constructor)."""
        return _from_options(cls, name, opts)

    def describe(self) -> str:
        loop = ", loop" if self.loop else ""
        return f"{self.name}: file {self.path} -> {self.ingress}, {self.ptime_ms} ms{loop}"

    async def run(self, emit: Emit, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file, call `task_status.started()`, then emit every frame on time.

        Without `loop`, the last partial frame is padded with silence and `run` returns at
        the end of the last frame's ptime (`start + frames * ptime`), i.e. after exactly the
        file's duration rounded up to a frame (plus any stall of the event loop: the file's
        clock then moves later rather than bursting, so no frame is dropped downstream). With
        `loop`, the file restarts at its end with no gap and no padding (timestamps keep
        counting) until `run` is cancelled.

        Raises OSError (naming the path) before `started()` when the file cannot be opened,
        MediaFileError when it holds no decodable audio.
        """
        key = self._cache_key()
        cached = _DECODED.get(key) if key is not None else None
        if cached is not None:
            container = None
            chunks = self._replay(cached)
        else:
            container = self._open()
            chunks = self._chunks(container)
        try:
            task_status.started()
            n = self.frame_samples
            ptime = self.ptime_ms / 1000
            start = trio.current_time()
            k = 0
            pending: np.ndarray | None = None
            for chunk in chunks:
                pending = chunk if pending is None else np.concatenate((pending, chunk))
                full = len(pending) // n
                for i in range(full):
                    start = await _play_at(start, k, ptime)
                    self._emit(emit, pending[i * n : (i + 1) * n], k * n)
                    k += 1
                pending = pending[full * n :] if len(pending) > full * n else None
            if pending is not None:
                last = np.zeros((n, self.channels), dtype=np.int16)
                last[: len(pending)] = pending
                start = await _play_at(start, k, ptime)
                self._emit(emit, last, k * n)
                k += 1
            await trio.sleep_until(start + k * ptime)
        finally:
            chunks.close()  # closes the container of the pass in progress
            if container is not None:
                container.close()  # idempotent; in case the first pass never started

    def _emit(self, emit: Emit, pcm: np.ndarray, timestamp: int) -> None:
        emit(AudioFrame(pcm, self.rate, timestamp))
        self.stats.frames_in += 1
        self.stats.bytes_in += pcm.nbytes

    def _open(self) -> av.container.InputContainer:
        """Open the file and check it has an audio stream."""
        try:
            container = av.open(str(self.path), mode="r")
        except OSError as err:  # av's FileNotFoundError etc. are OSErrors
            raise _os_error(err, self.path) from None
        except av.FFmpegError as err:
            raise MediaFileError(f"{self.path}: not an audio file FFmpeg can read ({err.strerror or err})") from None
        if not container.streams.audio:
            container.close()
            raise MediaFileError(f"{self.path}: no audio stream")
        return container

    async def prepare(self) -> None:
        """Decode the file into `_DECODED` (once per process and file version), in steps of
        one demuxed packet with a checkpoint between them, so the event loop is never held
        for more than a packet (the open itself, FFmpeg's probe, is the one longer step, a few
        ms, once). A file that decodes to more than `CACHE_FILE_MAX_BYTES` streams instead, as
        does one that fails here (`run()` then raises what is wrong)."""
        key = self._cache_key()
        if key is None or key in _STREAMED or _DECODED.get(key) is not None:
            return
        busy = _DECODING.get(key)
        if busy is not None:  # another route decodes this very file now: wait for it
            await busy.wait()
            return
        _DECODING[key] = done = trio.Event()
        try:
            await self._decode_into_cache(key)
        finally:
            del _DECODING[key]
            done.set()

    async def _decode_into_cache(self, key: tuple[object, ...]) -> None:
        try:
            container = self._open()
        except (OSError, GatewayError):
            return
        kept: list[np.ndarray] = []
        size = 0
        try:
            for chunk in self._decode(container):
                size += chunk.nbytes
                if size > CACHE_FILE_MAX_BYTES:
                    _STREAMED.add(key)
                    return
                kept.append(chunk)
                await trio.sleep(0)
        except GatewayError:
            return
        finally:
            container.close()
        if kept:
            _DECODED.put(key, np.concatenate(kept))

    def _cache_key(self) -> tuple[object, ...] | None:
        """What the decoded audio depends on: the file (path, size, mtime) and the output
        rate, channels and gain. None when the file cannot be stat'ed (`_open` says why)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (str(self.path), st.st_size, st.st_mtime_ns, self.rate, self.channels, self.gain_db)

    def _chunks(self, container: av.container.InputContainer) -> Generator[np.ndarray, None, None]:
        """Yield the file's audio as int16 arrays of shape (samples, channels), pass after
        pass when looping. Raises MediaFileError when a pass yields no samples. (A file that
        `prepare` kept in `_DECODED` is replayed from memory instead: `_replay`.)"""
        while True:
            samples = 0
            for chunk in self._decode(container):
                samples += len(chunk)
                yield chunk
            if samples == 0:
                raise MediaFileError(f"{self.path}: no audio samples")
            if not self.loop:
                return
            container = self._open()

    def _replay(self, pcm: np.ndarray) -> Generator[np.ndarray, None, None]:
        """The decoded file from memory, in views of one second, pass after pass when looping."""
        step = self.rate
        while True:
            for i in range(0, len(pcm), step):
                yield pcm[i : i + step]
            if not self.loop:
                return

    def _decode(self, container: av.container.InputContainer) -> Iterator[np.ndarray]:
        """One pass over the file: decoded, resampled, gain applied; closes `container`."""
        resampler = av.AudioResampler(format="s16", layout=_LAYOUTS[self.channels], rate=self.rate)
        gain = 10 ** (self.gain_db / 20) if self.gain_db else None
        try:
            stream = container.streams.audio[0]
            try:
                for decoded in container.decode(stream):
                    for frame in resampler.resample(decoded):
                        yield self._to_pcm(frame, gain)
                for frame in resampler.resample(None):  # flush the resampler's tail
                    yield self._to_pcm(frame, gain)
            except av.FFmpegError as err:
                raise MediaFileError(f"{self.path}: cannot decode audio ({err.strerror or err})") from None
        finally:
            container.close()

    def _to_pcm(self, frame: av.AudioFrame, gain: float | None) -> np.ndarray:
        # packed s16 comes out of PyAV as shape (1, samples * channels), interleaved
        pcm = frame.to_ndarray().reshape(-1, self.channels)
        if gain is not None:
            scaled = np.rint(pcm.astype(np.float32) * np.float32(gain))
            pcm = np.clip(scaled, -32768, 32767).astype(np.int16)
        return pcm


# ---------------------------------------------------------------------------------------


class Recorder(Endpoint[Frame]):
    """Records what a route sends it to a WAV (pcm_s16le) or Ogg/Opus (libopus) file.

    `send()` takes `AudioFrame`s of int16 shape (samples, `channels`) at `rate` Hz (any number
    of samples; the route sends `egress.samples(ptime_ms)`). Frames are written back to back
    in the order sent: the file's timeline is the samples received, `duration_s` seconds.

    Ogg/Opus files decode at 48 kHz whatever `rate` (8, 12, 16, 24 or 48 kHz) was encoded.
    """

    kind = "record"
    ingress = None

    def __init__(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        rate: int = 48000,
        channels: int = 1,
        ptime_ms: int = 20,
    ) -> None:
        """`format` is "wav" or "ogg"; None picks it from the extension (.wav, .ogg, .opus).
        Raises ValueError naming the option when a value is invalid."""
        super().__init__(name)
        self.path = _check_path(path)
        """The output file; parent directories are created by `run()`."""
        if format is None:
            format = _EXTENSIONS.get(self.path.suffix.lower())
            if format is None:
                raise ValueError(
                    f"option 'path' {str(self.path)!r} has no known extension (.wav, .ogg, .opus); "
                    "add one or set option 'format' to wav or ogg"
                )
        elif format not in RECORD_FORMATS:
            raise ValueError(f"option 'format' must be one of {', '.join(RECORD_FORMATS)}, got {format!r}")
        self.format = format
        """"wav" or "ogg"."""
        self.rate = _check_rate(rate, OPUS_RATES if format == "ogg" else None)
        """Sample rate of the frames `send` accepts, in Hz."""
        self.channels = _check_channels(channels)
        """Channels of the frames `send` accepts: 1 or 2."""
        self.ptime_ms = _check_ptime(ptime_ms, self.rate)
        self.egress = AudioFormat(Encoding.PCM16, self.rate, self.channels)
        self._layout = _LAYOUTS[self.channels]
        self._time_base = Fraction(1, self.rate)
        self._container: av.container.OutputContainer | None = None
        self._stream: av.AudioStream | None = None
        self._samples = 0  # per channel, written so far
        self.sessions = 0
        """Runs of the route that recorded audio, and the one recording now: session N > 1
        records to {stem}-N{suffix}. A session that recorded nothing leaves its name (and
        for N > 1 no file) to the next one: a route that fails and restarts for an hour
        leaves no trail of empty files, and its recordings keep consecutive names."""
        self.current_path = self.path

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Recorder:
        """Build from a config mapping with keys `path` (required, str), `format` ("wav" or
        "ogg", default from the extension), `rate` (int Hz, default 48000; 8000, 12000, 16000,
        24000 or 48000 for ogg), `channels` (1 or 2, default 1), `ptime_ms` (10, 20, 40 or 60,
        default 20; also the Opus frame duration).

        Raises ConfigError naming the key and what was expected.
        """
        return _from_config(cls, name, options, ("path", "format", "rate", "channels", "ptime_ms"))

    @classmethod
    def from_options(cls, name: str, opts: Any, runtime: Any = None) -> Recorder:
        """`from_config` from a route's endpoint options (the registry's constructor)."""
        return _from_options(cls, name, opts)

    @property
    def duration_s(self) -> float:
        """Seconds of audio written so far."""
        return self._samples / self.rate

    def describe(self) -> str:
        return f"{self.name}: record {self.format} {self.path} <- {self.egress}"

    async def run(self, emit: Emit, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create parent directories, open the output, call `task_status.started()`, then wait
        until cancelled. The file is finalized on the way out whatever the reason (encoder
        flushed, trailer written, WAV sizes patched), so a cancelled route leaves a playable
        file; an empty one only for the first session (`sessions`). Raises OSError naming the
        path when the file cannot be created."""
        self.sessions += 1
        # a route's next session must not overwrite the last recording
        self.current_path = (self.path if self.sessions == 1
                             else self.path.with_name(f"{self.path.stem}-{self.sessions}{self.path.suffix}"))
        self._open()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._close()

    async def send(self, frame: Frame) -> None:
        """Append one frame to the file. Frames sent while the file is not open (before
        `run()` started or after it ended) are dropped and counted in `stats.dropped`.

        Raises LocalProtocolError when the frame is not PCM of `rate` and `channels`.
        """
        await trio.lowlevel.checkpoint()
        if not isinstance(frame, AudioFrame) or frame.rate != self.rate or frame.pcm.shape[1:] != (self.channels,):
            got = (
                f"an AudioFrame of shape {frame.pcm.shape} at {frame.rate} Hz"
                if isinstance(frame, AudioFrame)
                else f"a {type(frame).__name__}"
            )
            raise LocalProtocolError(
                f"{self.kind} endpoint {self.name!r} takes {self.egress} AudioFrames of shape (samples, "
                f"{self.channels}), got {got}"
            )
        if self._container is None or self._stream is None:
            self.stats.dropped += 1
            return
        pcm = np.ascontiguousarray(frame.pcm, dtype=np.int16)
        # packed s16: PyAV wants one plane of shape (1, samples * channels), interleaved
        out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=self._layout)
        out.sample_rate = self.rate
        out.pts = self._samples
        out.time_base = self._time_base
        for packet in self._stream.encode(out):
            self._container.mux(packet)
        self._samples += frame.samples
        self.stats.frames_out += 1
        self.stats.bytes_out += pcm.nbytes

    def _open(self) -> None:
        """Create the file and write its header now (PyAV would defer both to the first
        frame), so an unwritable path fails before `started()` and an empty recording is
        still a file: a WAV of 0 samples, or an Ogg stream of just the Opus headers."""
        try:
            self.current_path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(self.current_path), mode="w", format=self.format)
        except OSError as err:  # av's FileNotFoundError / PermissionError are OSErrors too
            raise _os_error(err, self.current_path) from None
        try:
            if self.format == "ogg":
                stream = container.add_stream(
                    "libopus", rate=self.rate, layout=self._layout, options={"frame_duration": str(self.ptime_ms)}
                )
            else:
                stream = container.add_stream("pcm_s16le", rate=self.rate, layout=self._layout)
            container.start_encoding()
        except OSError as err:
            container.close()
            raise _os_error(err, self.current_path) from None
        except BaseException:
            container.close()
            raise
        self._samples = 0
        self._container, self._stream = container, stream

    def _close(self) -> None:
        container, stream = self._container, self._stream
        self._container = self._stream = None
        if container is None or stream is None:
            return
        try:
            for packet in stream.encode(None):  # flush the encoder's buffered samples
                container.mux(packet)
        finally:
            container.close()  # writes the trailer (Ogg last page, WAV RIFF/data sizes)
            if self._samples == 0:  # nothing recorded: the next session takes this name
                self.sessions -= 1
                if self.sessions > 0:
                    with contextlib.suppress(OSError):
                        self.current_path.unlink()
