"""The codec graph: formats as values, converters as stateful stages, a planner between them.

See DESIGN.md "Codec graph". Every stage has `input`, `output` (AudioFormat), `delay`
(samples at the output rate), `process(frame) -> list[Frame]` and `flush() -> list[Frame]`.
"""

from gateway.codecs.formats import (
    OPUS_48K,
    OPUS_48K_STEREO,
    PCM16_8K,
    PCM16_16K,
    PCM16_48K,
    PCM16_48K_STEREO,
    PCMU_8K,
    STANDARD_FORMATS,
    VALID_PTIMES_MS,
    AudioFormat,
    AudioFrame,
    EncodedFrame,
    Encoding,
    Frame,
)
from gateway.codecs.g711 import G711Decoder, G711Encoder
from gateway.codecs.mixer import ChannelMixer
from gateway.codecs.opus import (
    OPUS_PTIMES_MS,
    OpusDecoder,
    OpusEncoder,
    opus_strerror,
    packet_channels,
    packet_samples,
)
from gateway.codecs.planner import Chain, chain_of, plan
from gateway.codecs.reframe import Reframer
from gateway.codecs.resample import LowpassDesign, Resampler, design_lowpass, soxr_latency
from gateway.codecs.stage import Stage

__all__ = [
    "OPUS_48K",
    "OPUS_48K_STEREO",
    "OPUS_PTIMES_MS",
    "PCM16_16K",
    "PCM16_48K",
    "PCM16_48K_STEREO",
    "PCM16_8K",
    "PCMU_8K",
    "STANDARD_FORMATS",
    "VALID_PTIMES_MS",
    "AudioFormat",
    "AudioFrame",
    "Chain",
    "ChannelMixer",
    "EncodedFrame",
    "Encoding",
    "Frame",
    "G711Decoder",
    "G711Encoder",
    "LowpassDesign",
    "OpusDecoder",
    "OpusEncoder",
    "Reframer",
    "Resampler",
    "Stage",
    "chain_of",
    "design_lowpass",
    "opus_strerror",
    "packet_channels",
    "packet_samples",
    "plan",
    "soxr_latency",
]
