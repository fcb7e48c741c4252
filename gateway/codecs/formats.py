"""Audio formats as values, and the frames that flow between adapters and the codec graph.

A format is (encoding, rate, channels). PCM frames carry an int16 numpy array of shape
(samples, channels); encoded frames (u-law bytes, one Opus packet) stay bytes until a stage
decodes them (DESIGN.md, "The frame").
"""

from __future__ import annotations

import enum

import attrs
import numpy as np


class Encoding(enum.Enum):
    """Sample encodings the codec graph knows."""

    PCM16 = "pcm16"  #: signed 16-bit linear PCM, native int16 in memory, little-endian on the wire
    PCMU = "pcmu"  #: G.711 u-law, one byte per sample (ITU-T G.711, RFC 3551 §4.5.14)
    OPUS = "opus"  #: Opus, one packet per frame (RFC 6716), always 48 kHz here


@attrs.frozen
class AudioFormat:
    """What a stream carries: encoding, sample rate in Hz, channel count."""

    encoding: Encoding
    """How samples are coded."""
    rate: int
    """Sample rate in Hz (8000, 16000, 48000, or another rate for files)."""
    channels: int = 1
    """1 (mono) or 2 (stereo, interleaved on the wire)."""

    @property
    def is_pcm(self) -> bool:
        return self.encoding is Encoding.PCM16

    def as_pcm(self) -> AudioFormat:
        """The PCM16 format with this rate and channel count (what a decoder produces)."""
        return AudioFormat(Encoding.PCM16, self.rate, self.channels)

    def samples(self, ptime_ms: int) -> int:
        """Samples per channel in `ptime_ms` milliseconds."""
        return self.rate * ptime_ms // 1000

    def __str__(self) -> str:
        ch = {1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels}ch")
        return f"{self.encoding.value}/{self.rate}/{ch}"


PCMU_8K = AudioFormat(Encoding.PCMU, 8000, 1)
PCM16_8K = AudioFormat(Encoding.PCM16, 8000, 1)
PCM16_16K = AudioFormat(Encoding.PCM16, 16000, 1)
PCM16_48K = AudioFormat(Encoding.PCM16, 48000, 1)
PCM16_48K_STEREO = AudioFormat(Encoding.PCM16, 48000, 2)
OPUS_48K = AudioFormat(Encoding.OPUS, 48000, 1)
OPUS_48K_STEREO = AudioFormat(Encoding.OPUS, 48000, 2)

#: Every format the graph must convert between, any pair.
STANDARD_FORMATS = (
    PCMU_8K,
    PCM16_8K,
    PCM16_16K,
    PCM16_48K,
    PCM16_48K_STEREO,
    OPUS_48K,
    OPUS_48K_STEREO,
)

VALID_PTIMES_MS = (10, 20, 40, 60)


@attrs.frozen(slots=True)
class AudioFrame:
    """PCM audio: int16 array of shape (samples, channels) at `rate` Hz.

    `timestamp` counts samples (per channel) since the stream started, RTP-style, so gaps and
    reordering are visible without wall-clock reads.
    """

    pcm: np.ndarray[tuple[int, int], np.dtype[np.int16]]
    """int16, shape (samples, channels), C-contiguous."""
    rate: int
    """Sample rate in Hz."""
    timestamp: int = 0
    """Samples since the stream started, at `rate`."""

    @property
    def samples(self) -> int:
        return self.pcm.shape[0]

    @property
    def channels(self) -> int:
        return self.pcm.shape[1]

    @property
    def duration(self) -> float:
        """Seconds of audio in the frame."""
        return self.pcm.shape[0] / self.rate

    @classmethod
    def from_bytes(cls, data: bytes, rate: int, channels: int = 1, timestamp: int = 0) -> AudioFrame:
        """Frame from interleaved signed 16-bit little-endian bytes; raises ValueError when
        `len(data)` is not a whole number of samples."""
        width = 2 * channels
        if len(data) % width:
            raise ValueError(f"{len(data)} bytes is not a whole number of {channels}-channel int16 samples")
        pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
        return cls(pcm, rate, timestamp)

    def to_bytes(self) -> bytes:
        """Interleaved signed 16-bit little-endian bytes."""
        return self.pcm.astype("<i2", copy=False).tobytes()

    @classmethod
    def silence(cls, samples: int, rate: int, channels: int = 1, timestamp: int = 0) -> AudioFrame:
        return cls(np.zeros((samples, channels), dtype=np.int16), rate, timestamp)


@attrs.frozen(slots=True)
class EncodedFrame:
    """One encoded frame: `payload` is u-law bytes or exactly one Opus packet."""

    payload: bytes
    """The coded bytes, as they go on the wire (without transport headers)."""
    format: AudioFormat
    """Encoding, rate and channels of the payload."""
    samples: int
    """Duration in samples per channel at `format.rate` (e.g. 960 for 20 ms of Opus)."""
    timestamp: int = 0
    """Samples since the stream started, at `format.rate`."""

    @property
    def duration(self) -> float:
        return self.samples / self.format.rate


Frame = AudioFrame | EncodedFrame
