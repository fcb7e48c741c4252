"""The planner: the chain of stages that converts one format into another.

Order (DESIGN.md "Codec graph"): decode (G711Decoder / OpusDecoder) -> down-mix (before
resampling: half the work) -> Resampler -> up-mix (after resampling) -> Reframer (when a
ptime is asked for; last for PCM, or right before the encoder) -> encode (G711Encoder /
OpusEncoder). One chain per stream direction: every stage holds that stream's state.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import attrs

from gateway.codecs.formats import AudioFormat, Encoding, Frame
from gateway.codecs.g711 import G711Decoder, G711Encoder
from gateway.codecs.mixer import ChannelMixer
from gateway.codecs.opus import (
    FEC_PACKET_LOSS_PERC,
    OPUS_INPUT_RATES,
    OPUS_PTIMES_MS,
    OPUS_RATE,
    OpusDecoder,
    OpusEncoder,
)
from gateway.codecs.reframe import Reframer
from gateway.codecs.resample import Resampler
from gateway.codecs.stage import Stage


@attrs.define(eq=False)
class Chain:
    """Stages applied in order; itself a stage from `input` to `output`.

    `process(frame)` returns what the last stage emits for that frame (zero, one or several
    frames: a Reframer emits only whole frames, a decimating Resampler fed odd sizes may emit
    a sample more or less). An empty chain passes frames through unchanged.
    """

    stages: tuple[Stage, ...]
    """The stages, first to last."""
    input: AudioFormat
    """Format `process` accepts."""
    output: AudioFormat
    """Format of the frames returned."""

    @property
    def delay_ms(self) -> float:
        """Sum of the stages' algorithmic delays, in ms (buffering in a Reframer excluded)."""
        return sum(1000 * s.delay / s.output.rate for s in self.stages if s.output.rate)

    @property
    def delay(self) -> int:
        """`delay_ms` in samples at `output.rate` (rounded)."""
        return round(self.delay_ms * self.output.rate / 1000)

    def process(self, frame: Frame) -> Sequence[Frame]:
        frames: Sequence[Frame] = [frame]
        for stage in self.stages:
            if len(frames) == 1:
                frames = stage.process(frames[0])
            else:
                out: list[Frame] = []
                for f in frames:
                    out.extend(stage.process(f))
                frames = out
            if not frames:
                break
        return frames

    def flush(self) -> list[Frame]:
        """End of stream: flush each stage in order, feeding its tail through the rest."""
        frames: list[Frame] = []
        for stage in self.stages:
            out: list[Frame] = []
            for f in frames:
                out.extend(stage.process(f))
            out.extend(stage.flush())
            frames = out
        return frames

    def __str__(self) -> str:
        names = " -> ".join(type(s).__name__ for s in self.stages) or "pass-through"
        return f"{self.input} => {self.output}: {names} ({self.delay_ms:.2f} ms)"


def _format_error(fmt: AudioFormat) -> str | None:
    """Why `fmt` cannot be produced or consumed by the graph, or None if it can."""
    if fmt.encoding is Encoding.PCMU and (fmt.rate, fmt.channels) != (8000, 1):
        return f"{fmt}: PCMU is 8 kHz mono only (RFC 3551 §4.5.14)"
    if fmt.encoding is Encoding.OPUS and (fmt.rate != OPUS_RATE or fmt.channels not in (1, 2)):
        return f"{fmt}: Opus runs at 48 kHz, mono or stereo, here"
    if fmt.encoding is Encoding.PCM16 and (fmt.rate <= 0 or fmt.channels not in (1, 2)):
        return f"{fmt}: PCM needs a positive rate and 1 or 2 channels"
    return None


def _check_opus_input_rate(rate: int | None) -> None:
    if rate is not None and (isinstance(rate, bool) or rate not in OPUS_INPUT_RATES):
        raise ValueError(f"opus_input_rate must be one of {', '.join(map(str, OPUS_INPUT_RATES))} Hz "
                         f"(or None: from the source), got {rate!r}")


def opus_input_rate_for(source_rates: Iterable[AudioFormat | int], override: int | None = None) -> int:
    """The rate (Hz) an Opus encoder fed by these sources takes its PCM at: `override` when
    given (one of OPUS_INPUT_RATES, else ValueError naming it), else the lowest Opus input
    rate at or above the highest source rate (a source's format counts by its rate; an Opus
    source decodes at 48 kHz). So u-law or 8 kHz PCM -> 8000, 16 kHz -> 16000, 22.05 kHz ->
    24000, 44.1 or 48 kHz -> 48000; a mix of 8 and 48 kHz sources -> 48000; no source at all
    -> 48000. The one rule the planner (`plan`, for `dst` Opus) and the route's pacer (its
    working PCM rate for an Opus sink) share."""
    _check_opus_input_rate(override)
    if override is not None:
        return override
    rates = [s.rate if isinstance(s, AudioFormat) else int(s) for s in source_rates]
    highest = max(rates, default=OPUS_RATE)
    return next((r for r in OPUS_INPUT_RATES if r >= highest), OPUS_RATE)


def plan(
    src: AudioFormat,
    dst: AudioFormat,
    *,
    ptime_ms: int | None = None,
    opus_bitrate: int | None = None,
    opus_complexity: int | Literal["auto"] | None = None,
    opus_fec: bool = False,
    opus_expected_loss_pct: int = FEC_PACKET_LOSS_PERC,
    opus_min_packet_bytes: int = 0,
    opus_input_rate: int | None = None,
) -> Chain:
    """The chain converting frames of `src` into frames of `dst`.

    `ptime_ms`: when given, the output comes in frames of exactly that duration (a Reframer
    before the encoder, or last for PCM); when None, output frames follow the input's (for an
    Opus `dst` the caller then promises frames of a valid Opus size). `opus_bitrate` (bit/s),
    `opus_complexity` (0-10, or "auto": by the input rate, `auto_complexity`), `opus_fec`
    with `opus_expected_loss_pct` (in-band FEC and the loss it is tuned for) and
    `opus_min_packet_bytes` (shorter packets become silence packets)
    configure an Opus encoder (`OpusEncoder`). `opus_input_rate` is the rate (Hz) the Opus
    encoder takes its PCM at: None (auto) picks `opus_input_rate_for(src)`, the lowest Opus
    input rate at or above the source's (u-law 8 kHz -> 8000: no Resampler, narrowband
    packets at a third of the encoder's CPU; 44.1 kHz -> 48000); an explicit one of 8000,
    12000, 16000, 24000, 48000 forces it (a Resampler when the source is at another rate).
    The packets are Opus 48 kHz whatever it is. Same `src` and `dst`: an empty chain (a lone
    Reframer for PCM with a ptime; encoded frames are never re-coded just to re-frame them).

    Raises ValueError naming both formats when no chain exists (PCMU other than 8 kHz mono,
    Opus other than 48 kHz, more than 2 channels, a ptime Opus cannot code, an
    `opus_input_rate` libopus does not take).
    """
    _check_opus_input_rate(opus_input_rate)
    for fmt in (src, dst):
        if (why := _format_error(fmt)) is not None:
            raise ValueError(f"cannot convert {src} to {dst}: {why}")
    if ptime_ms is not None:
        if ptime_ms <= 0 or dst.as_pcm().samples(ptime_ms) <= 0:
            raise ValueError(f"cannot convert {src} to {dst}: ptime {ptime_ms} ms is not a positive duration")
        if dst.encoding is Encoding.OPUS and ptime_ms not in OPUS_PTIMES_MS:
            raise ValueError(f"cannot convert {src} to {dst}: Opus ptime must be one of {OPUS_PTIMES_MS} ms, not {ptime_ms}")

    if src == dst:
        stages: list[Stage] = [Reframer(dst, ptime_ms)] if dst.is_pcm and ptime_ms is not None else []
        return Chain(tuple(stages), src, dst)

    stages = []
    if src.encoding is Encoding.PCMU:
        stages.append(G711Decoder())
    elif src.encoding is Encoding.OPUS:
        stages.append(OpusDecoder(src.channels))
    rate, channels = src.rate, src.channels
    target = dst.as_pcm()
    if dst.encoding is Encoding.OPUS:
        target = attrs.evolve(target, rate=opus_input_rate_for([src], opus_input_rate))
    if channels > target.channels:
        stages.append(ChannelMixer(channels, target.channels, rate=rate))
        channels = target.channels
    if rate != target.rate:
        stages.append(Resampler(rate, target.rate, channels))
        rate = target.rate
    if channels < target.channels:
        stages.append(ChannelMixer(channels, target.channels, rate=rate))
        channels = target.channels
    if ptime_ms is not None:
        stages.append(Reframer(target, ptime_ms))
    if dst.encoding is Encoding.PCMU:
        stages.append(G711Encoder())
    elif dst.encoding is Encoding.OPUS:
        stages.append(OpusEncoder(dst.channels, ptime_ms, bitrate=opus_bitrate, complexity=opus_complexity,
                                  fec=opus_fec, expected_loss_pct=opus_expected_loss_pct,
                                  min_packet_bytes=opus_min_packet_bytes, input_rate=target.rate))
    return Chain(tuple(stages), src, dst)


def chain_of(stages: Sequence[Stage]) -> Chain:
    """A Chain of hand-picked stages (input of the first, output of the last). Raises
    ValueError for an empty list or when one stage's output is not the next one's input."""
    if not stages:
        raise ValueError("chain_of needs at least one stage")
    for a, b in zip(stages, stages[1:]):
        any_rate = isinstance(b, ChannelMixer) and b.rate is None
        if a.output != b.input and not (any_rate and attrs.evolve(a.output, rate=0) == b.input):
            raise ValueError(f"{type(a).__name__} outputs {a.output} but {type(b).__name__} takes {b.input}")
    return Chain(tuple(stages), stages[0].input, stages[-1].output)
