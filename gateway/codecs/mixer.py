"""Channel count conversion: mono <-> stereo."""

from __future__ import annotations

import attrs
import numpy as np

from gateway.codecs.formats import AudioFormat, AudioFrame, Encoding, Frame
from gateway.codecs.stage import check_pcm


@attrs.define(eq=False)
class ChannelMixer:
    """PCM16 `in_channels` -> `out_channels` (1 -> 2, 2 -> 1, or n -> n), rate unchanged.

    Mono -> stereo copies the sample to both channels; stereo -> mono is the mean, summed in
    int32 and floor-divided by 2 (no overflow: (32767 + 32767) // 2 = 32767). No delay, no
    state. Raises ValueError for other channel counts at construction and LocalProtocolError
    for a frame of another rate or width.
    """

    in_channels: int
    """Channels of the input frames (1 or 2)."""
    out_channels: int
    """Channels of the output frames (1 or 2)."""
    rate: int | None = attrs.field(default=None, kw_only=True)
    """Sample rate in Hz, unchanged; None accepts frames of any rate (and `input.rate` /
    `output.rate` are then 0). The planner always sets it."""
    input: AudioFormat = attrs.field(init=False)
    output: AudioFormat = attrs.field(init=False)
    delay: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.in_channels not in (1, 2) or self.out_channels not in (1, 2):
            raise ValueError(f"ChannelMixer converts between 1 and 2 channels, not {self.in_channels} -> {self.out_channels}")
        self.input = AudioFormat(Encoding.PCM16, self.rate or 0, self.in_channels)
        self.output = AudioFormat(Encoding.PCM16, self.rate or 0, self.out_channels)

    def process(self, frame: Frame) -> list[AudioFrame]:
        frame = check_pcm(frame, self.input, "ChannelMixer", any_rate=self.rate is None)
        if self.in_channels == self.out_channels:
            return [frame]
        pcm = frame.pcm
        if self.out_channels == 2:
            out = np.empty((pcm.shape[0], 2), dtype=np.int16)
            out[:] = pcm  # broadcast (n, 1) -> (n, 2)
        else:
            total = pcm[:, 0].astype(np.int32)
            total += pcm[:, 1]
            total //= 2
            out = total.astype(np.int16).reshape(-1, 1)
        return [AudioFrame(out, frame.rate, frame.timestamp)]

    def flush(self) -> list[AudioFrame]:
        return []
