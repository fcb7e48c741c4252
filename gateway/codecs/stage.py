"""The stage protocol every converter of the codec graph follows, and input checks.

A stage turns frames of its `input` format into frames of its `output` format. Stages are
synchronous and stateful (one per stream direction, DESIGN.md "Codec graph"); `process` may
return zero, one or several frames for one input frame, and `flush` returns whatever the stage
still holds at the end of the stream and resets it for a new stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from gateway.codecs.formats import AudioFormat, AudioFrame, EncodedFrame, Encoding, Frame
from gateway.errors import LocalProtocolError


@runtime_checkable
class Stage(Protocol):
    """One converter of a chain (`G711Decoder`, `Resampler`, `Reframer`, `OpusEncoder`, ...)."""

    input: AudioFormat
    """Format of the frames `process` accepts."""
    output: AudioFormat
    """Format of the frames `process` and `flush` return."""
    delay: int
    """Algorithmic delay in samples at `output.rate`: an input sample at time t comes out at
    t + delay. Buffering of partial frames (the `Reframer`) is not counted here."""

    def process(self, frame: Frame) -> Sequence[Frame]:
        """Convert one frame; raises LocalProtocolError when `frame` does not match `input`.
        (A list: typed Sequence so that each stage can say which kind of frame it returns.)"""
        ...

    def flush(self) -> Sequence[Frame]:
        """End of stream: return what is still held back, then reset for a new stream."""
        ...


def check_pcm(frame: object, fmt: AudioFormat, who: str, *, any_rate: bool = False) -> AudioFrame:
    """Return `frame` if it is a PCM `AudioFrame` of `fmt.rate` (any rate if `any_rate`) and
    `fmt.channels`.

    Raises LocalProtocolError otherwise (feeding a stage the wrong format is our bug).
    """
    if not isinstance(frame, AudioFrame):
        raise LocalProtocolError(f"{who} takes AudioFrame ({fmt}), got {type(frame).__name__}")
    pcm = frame.pcm
    if pcm.dtype != np.int16 or pcm.ndim != 2:
        raise LocalProtocolError(f"{who} takes int16 pcm of shape (samples, channels), got {pcm.dtype} {pcm.shape}")
    if (frame.rate != fmt.rate and not any_rate) or pcm.shape[1] != fmt.channels:
        raise LocalProtocolError(
            f"{who} takes {fmt}, got a frame of {frame.rate} Hz with {pcm.shape[1]} channel(s)"
        )
    return frame


def check_encoded(frame: object, encoding: Encoding, who: str) -> EncodedFrame:
    """Return `frame` if it is an `EncodedFrame` of `encoding`; else LocalProtocolError."""
    if not isinstance(frame, EncodedFrame) or frame.format.encoding is not encoding:
        got = frame.format if isinstance(frame, EncodedFrame) else type(frame).__name__
        raise LocalProtocolError(f"{who} takes {encoding.value} EncodedFrame, got {got}")
    return frame
