"""G.711 u-law (PCMU) encoder and decoder stages, via the C code of `audioop`.

ITU-T G.711 (11/88) Table 2a; RFC 3551 §4.5.14 (PCMU, 8 kHz mono, one byte per sample).
`audioop` implements the classic Sun g711.c (`st_14linear2ulaw` / `st_ulaw2linear16`): a
16-bit sample is truncated to 14 bits, biased by 33 and coded as sign, 3-bit segment and
4-bit mantissa, all bits inverted. Decoding 0xFF and 0x7F gives 0, 0x00 gives -32124 and
0x80 gives +32124.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # stdlib audioop warns of its removal in 3.13 (PEP 594); audioop-lts provides it from then on
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # pragma: no cover - depends on the interpreter
        raise ImportError("G.711 needs the audioop module: install audioop-lts on Python >= 3.13") from None

import attrs
import numpy as np

from gateway.codecs.formats import (
    PCM16_8K,
    PCMU_8K,
    AudioFormat,
    AudioFrame,
    EncodedFrame,
    Encoding,
    Frame,
)
from gateway.codecs.stage import check_encoded, check_pcm

SAMPLE_WIDTH = 2  # bytes per linear sample handed to audioop (int16)


@attrs.define(eq=False)
class G711Encoder:
    """PCM16 8 kHz mono `AudioFrame` -> u-law `EncodedFrame` (PCMU_8K), sample by sample.

    Any frame length is accepted; the payload has one byte per sample. No delay, no state.
    Raises LocalProtocolError for a frame that is not PCM16 8 kHz mono.
    """

    input: AudioFormat = attrs.field(default=PCM16_8K, init=False)
    output: AudioFormat = attrs.field(default=PCMU_8K, init=False)
    delay: int = attrs.field(default=0, init=False)

    def process(self, frame: Frame) -> list[EncodedFrame]:
        frame = check_pcm(frame, PCM16_8K, "G711Encoder")
        # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; it is a buffer on 3.11 too
        payload = audioop.lin2ulaw(np.ascontiguousarray(frame.pcm), SAMPLE_WIDTH)  # type: ignore[arg-type]
        return [EncodedFrame(payload, PCMU_8K, frame.pcm.shape[0], frame.timestamp)]

    def flush(self) -> list[EncodedFrame]:
        return []


@attrs.define(eq=False)
class G711Decoder:
    """u-law `EncodedFrame` -> PCM16 8 kHz mono `AudioFrame` of shape (len(payload), 1).

    Every byte is a valid u-law code, so decoding cannot fail on the peer's data; a frame of
    another encoding raises LocalProtocolError. The returned pcm is read-only (it views the
    bytes audioop returned).
    """

    input: AudioFormat = attrs.field(default=PCMU_8K, init=False)
    output: AudioFormat = attrs.field(default=PCM16_8K, init=False)
    delay: int = attrs.field(default=0, init=False)

    def process(self, frame: Frame) -> list[AudioFrame]:
        frame = check_encoded(frame, Encoding.PCMU, "G711Decoder")
        linear = audioop.ulaw2lin(frame.payload, SAMPLE_WIDTH)  # native-endian int16
        pcm = np.frombuffer(linear, dtype=np.int16).reshape(-1, 1)
        return [AudioFrame(pcm, PCMU_8K.rate, frame.timestamp)]

    def flush(self) -> list[AudioFrame]:
        return []
