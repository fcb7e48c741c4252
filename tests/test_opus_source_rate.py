"""Issue 12, "Encode Opus at the source's rate": the planner (and the route's pacer, through the
same rule) feeds libopus at the lowest of 8, 12, 16, 24, 48 kHz that holds the source, unless
an `opus_input_rate` forces one; the packets are Opus 48 kHz whatever it is. Real libopus and
real speech (gateway/assets: or105 8 kHz, speech16k, stereo48k); nothing here is timed."""

from __future__ import annotations

import types

import numpy as np
import pytest
import soxr
import trio

from conftest import ASSETS
from gateway.adapters.argon import room as room_module
from gateway.codecs import (
    OPUS_48K,
    OPUS_48K_STEREO,
    PCM16_8K,
    PCM16_16K,
    PCM16_48K,
    PCMU_8K,
    AudioFormat,
    AudioFrame,
    EncodedFrame,
    Encoding,
    OpusDecoder,
    OpusEncoder,
    Reframer,
    Resampler,
    plan,
)
from gateway.codecs.opus import packet_bandwidth, packet_channels, packet_samples, silence_packet
from gateway.codecs.planner import opus_input_rate_for
from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from gateway.errors import ConfigError
from gateway.quality import best_alignment, blockwise_alignment, read_wav
from gateway.route import Route
from harness import start
from test_agent_routes import check_speech, clip

SPACE = "550e8400-e29b-41d4-a716-446655440000"
CHANNEL = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
NB, WB, FB = 4000, 8000, 20000  # audio bandwidths (Hz) a TOC names


def pcm16(fmt: AudioFormat) -> AudioFormat:
    return AudioFormat(Encoding.PCM16, fmt.rate, fmt.channels)


def source_frames(fmt: AudioFormat, pcm: np.ndarray) -> list:
    """20 ms frames of `fmt` (PCM, or u-law through the G.711 encoder) carrying int16 `pcm`."""
    chain = plan(pcm16(fmt), fmt)
    n = fmt.rate // 50
    frames = []
    for i in range(0, len(pcm) - n + 1, n):
        frames += chain.process(AudioFrame(np.ascontiguousarray(pcm[i : i + n]), fmt.rate, i))
    return frames


def encode(src: AudioFormat, dst: AudioFormat, pcm: np.ndarray, **options) -> tuple:
    chain = plan(src, dst, ptime_ms=20, **options)
    packets = [p for f in source_frames(src, pcm) for p in chain.process(f)]
    return chain, packets


def decode(packets: list, channels: int) -> np.ndarray:
    dec = OpusDecoder(channels)
    return np.concatenate([dec.process(p)[0].pcm for p in packets])


def stage_types(chain) -> list:
    return [type(s) for s in chain.stages]


def speech_survives(reference: np.ndarray, ref_rate: int, received: np.ndarray) -> None:
    corr, lag = best_alignment(reference, ref_rate, received, 48000)
    blocks = blockwise_alignment(reference, ref_rate, received, 48000)
    assert corr > 0.8 and abs(lag) < 0.02, (corr, lag)
    assert len(blocks) >= 3 and sum(b > 0.85 for b in blocks) >= 0.9 * len(blocks), np.round(blocks, 2)


@pytest.fixture(scope="module")
def speech8k() -> np.ndarray:
    pcm, rate = read_wav(ASSETS / "or105.wav")
    assert rate == 8000
    return pcm[4000 : 4000 + 3 * 8000]  # 3 s of speech, (n, 1) int16


# --- the planner's choice ----------------------------------------------------------------------

def test_ulaw_8k_is_encoded_at_8k_narrowband_without_a_resampler(speech8k):
    chain, packets = encode(PCMU_8K, OPUS_48K, speech8k)
    assert Resampler not in stage_types(chain)
    encoder = chain.stages[-1]
    assert isinstance(encoder, OpusEncoder) and encoder.input_rate == 8000 and encoder.input == PCM16_8K
    assert encoder.output == OPUS_48K
    assert {packet_bandwidth(p.payload) for p in packets} == {NB}  # the TOC says narrowband
    # 48 kHz units, as any Opus stream: 960 per 20 ms packet, timestamps k * 960
    assert all(p.samples == 960 == packet_samples(p.payload) for p in packets)
    assert [p.timestamp for p in packets] == [960 * k for k in range(len(packets))]
    assert encoder.delay == 312 and chain.delay_ms == pytest.approx(6.5)  # no resampler's 4.5 ms
    speech_survives(speech8k, 8000, decode(packets, 1))


def test_16k_is_encoded_at_16k_wideband():
    pcm, rate = read_wav(ASSETS / "speech16k.wav")
    assert rate == 16000
    chain, packets = encode(PCM16_16K, OPUS_48K, pcm[:, :1])
    assert stage_types(chain) == [Reframer, OpusEncoder] and chain.stages[-1].input_rate == 16000
    bands = {packet_bandwidth(p.payload) for p in packets}
    assert max(bands) == WB and bands <= {NB, 6000, WB}
    speech_survives(pcm[:, 0], 16000, decode(packets, 1))


def test_stereo_48k_file_stays_48k_stereo_full_band():
    pcm, rate = read_wav(ASSETS / "stereo48k.wav")  # the same file as /work/shared/audio/stereo48k.wav
    assert (rate, pcm.shape[1]) == (48000, 2)
    pcm = pcm[: 3 * 48000]
    src = AudioFormat(Encoding.PCM16, 48000, 2)
    chain, packets = encode(src, OPUS_48K_STEREO, pcm)
    assert stage_types(chain) == [Reframer, OpusEncoder]
    encoder = chain.stages[-1]
    assert (encoder.input_rate, encoder.channels) == (48000, 2)
    assert {packet_bandwidth(p.payload) for p in packets if len(p.payload) > 3} == {FB}
    assert {packet_channels(p.payload) for p in packets} == {2}
    y = decode(packets, 2)
    for c in range(2):  # left stays left, right stays right
        corr, _ = best_alignment(pcm[:, c], 48000, y[:, c], 48000)
        assert corr > 0.8, (c, corr)


@pytest.mark.parametrize("rate, expected, resampled", [
    (44100, 48000, True), (22050, 24000, True), (11025, 12000, True), (12000, 12000, False),
    (24000, 24000, False), (48000, 48000, False),
])
def test_other_pcm_rates_round_up_to_an_opus_rate(rate, expected, resampled):
    chain = plan(AudioFormat(Encoding.PCM16, rate, 1), OPUS_48K, ptime_ms=20)
    assert chain.stages[-1].input_rate == expected
    assert (Resampler in stage_types(chain)) is resampled
    t = np.arange(rate) / rate  # 1 s of a 440 Hz tone: it arrives as 48 kHz Opus
    tone = np.rint(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)[:, None]
    n = rate // 50
    out = []
    for i in range(0, len(tone) - n + 1, n):
        out += chain.process(AudioFrame(np.ascontiguousarray(tone[i : i + n]), rate, i))
    assert out and all(p.format == OPUS_48K and p.samples == 960 for p in out)


def test_opus_source_is_encoded_at_48k():
    chain = plan(OPUS_48K_STEREO, OPUS_48K, ptime_ms=20)
    assert chain.stages[-1].input_rate == 48000 and Resampler not in stage_types(chain)


def test_override_48k_puts_the_resampler_back(speech8k):
    chain, packets = encode(PCMU_8K, OPUS_48K, speech8k, opus_input_rate=48000)
    assert Resampler in stage_types(chain) and chain.stages[-1].input_rate == 48000
    assert chain.delay_ms == pytest.approx(11.0)  # the resampler's 4.5 ms + the lookahead
    assert {packet_bandwidth(p.payload) for p in packets} == {FB}
    speech_survives(speech8k, 8000, decode(packets, 1))


def test_override_below_the_source_rate_downsamples():
    chain = plan(PCM16_48K, OPUS_48K, ptime_ms=20, opus_input_rate=16000)
    assert stage_types(chain) == [Resampler, Reframer, OpusEncoder] and chain.stages[-1].input_rate == 16000


@pytest.mark.parametrize("bad", [44100, 32000, 0, 96000])
def test_unsupported_override_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=rf"opus_input_rate must be one of 8000, 12000, 16000, 24000, 48000.*got {bad}"):
        plan(PCMU_8K, OPUS_48K, opus_input_rate=bad)
    with pytest.raises(ValueError, match=str(bad)):
        opus_input_rate_for([PCMU_8K], bad)
    with pytest.raises(ValueError, match=f"got {bad}"):
        OpusEncoder(1, 20, input_rate=bad)


def test_the_rule_for_several_sources():
    assert opus_input_rate_for([PCMU_8K]) == 8000
    assert opus_input_rate_for([PCMU_8K, PCM16_16K]) == 16000
    assert opus_input_rate_for([PCMU_8K, PCM16_48K]) == 48000  # a mix of 8 and 48 kHz: 48 kHz
    assert opus_input_rate_for([PCMU_8K, OPUS_48K]) == 48000  # Opus decodes at 48 kHz
    assert opus_input_rate_for([44100, 8000]) == 48000
    assert opus_input_rate_for([96000]) == 48000  # above what Opus takes: resampled down
    assert opus_input_rate_for([]) == 48000  # nobody feeds it yet
    assert opus_input_rate_for([PCM16_48K], 8000) == 8000  # the override wins


def test_encoder_at_8k_keeps_silence_packets_and_flush_in_48k_units():
    # digital silence codes to 3-byte CELT packets at 8 kHz; with min_packet_bytes above that
    # each is replaced by the silence packet of the same duration: 20 ms, 960 samples at 48 kHz
    enc = OpusEncoder(1, 20, input_rate=8000, min_packet_bytes=4)
    packets = [enc.process(AudioFrame.silence(160, 8000, 1, 160 * k))[0] for k in range(40)]
    assert enc.filled == 40
    assert {(p.payload, p.samples) for p in packets} == {(silence_packet(960), 960)}
    tail = enc.flush()  # the 6.5 ms lookahead (52 samples at 8 kHz) fits one more packet
    assert [(p.samples, p.timestamp) for p in tail] == [(960, 40 * 960)]
    with pytest.raises(Exception, match="160 samples"):
        enc.process(AudioFrame.silence(960, 8000))  # 48 kHz-sized frames are not 20 ms at 8 kHz
    any_size = OpusEncoder(1, None, input_rate=8000)
    assert [any_size.process(AudioFrame.silence(n, 8000))[0].samples for n in (20, 40, 80, 160, 480)] == \
        [120, 240, 480, 960, 2880]


def test_no_bitrate_set_asks_for_at_least_32_kbps_at_8k_and_24_kbps_at_12_and_16k():
    assert OpusEncoder(1, 20, input_rate=8000).target_bitrate == 32000
    assert OpusEncoder(1, 20, input_rate=12000).target_bitrate == 24000
    assert OpusEncoder(2, 20, input_rate=16000).target_bitrate == 48000
    assert OpusEncoder(1, 20, input_rate=24000).target_bitrate is None  # libopus's own (27 kb/s)
    assert OpusEncoder(1, 20, input_rate=48000).target_bitrate is None
    assert OpusEncoder(1, 20, input_rate=8000, bitrate=12000).target_bitrate == 12000


# --- the route -----------------------------------------------------------------------------------

def fake(ingress=None, egress=None, options=None):
    return types.SimpleNamespace(ingress=ingress, egress=egress, encoder_options=options or {})


def test_route_pacing_format_follows_the_sources_feeding_the_sink():
    argon = fake(egress=OPUS_48K_STEREO, options={"opus_input_rate": None})
    phone, music = fake(ingress=PCM16_8K), fake(ingress=PCM16_48K)
    assert Route.pacing_format(argon, [phone]) == AudioFormat(Encoding.PCM16, 8000, 2)
    assert Route.pacing_format(argon, [phone, music]) == AudioFormat(Encoding.PCM16, 48000, 2)
    forced = fake(egress=OPUS_48K, options={"opus_input_rate": 48000})
    assert Route.pacing_format(forced, [phone]) == PCM16_48K
    recorder = fake(egress=PCM16_16K)  # a PCM sink paces at its own format, as before
    assert Route.pacing_format(recorder, [music]) == PCM16_16K


BRIDGE = """
routes:
  - name: channel
    endpoints:
      - argon: {role: listen, space_id: %s, channel_id: %s}
      - record: {name: heard, path: "$out/heard.wav", rate: 48000}
  - name: bridge
    endpoints:
      - file: {name: caller, path: "$caller", rate: 8000}
      - argon: {name: bot, space_id: %s, channel_id: %s$options}
""" % (SPACE, CHANNEL, SPACE, CHANNEL)


async def run_bridge(tmp_path, monkeypatch, options: str, *, waveform: bool):
    caller, caller_pcm, rate = clip(tmp_path, "caller.wav", "or105.wav", 0.3, 2.5)
    published: list[bytes] = []
    real_publish = room_module.Room.publish

    def publish(self, session, packet, samples):
        if session.path.publishes:
            published.append(bytes(packet))
        return real_publish(self, session, packet, samples)

    monkeypatch.setattr(room_module.Room, "publish", publish)
    async with trio.open_nursery() as nursery:
        gateway = await start(nursery, BRIDGE, caller=caller, out=str(tmp_path), options=options)
        with trio.fail_after(20):
            await gateway.routes["bridge"].sessions_done.wait()
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    check_speech(caller_pcm, rate, tmp_path / "heard.wav", min_seconds=2.0, what="8 kHz file → channel",
                 waveform=waveform)
    return gateway.routes["bridge"].route, published


@pytest.mark.parametrize("options", ["", ", opus_input_rate: auto"], ids=["default", "auto"])
async def test_route_from_8k_source_to_argon_encodes_at_8k(tmp_path, monkeypatch, options):
    # the default since PESQ judged it (NB 4.25-4.39 against 4.44-4.46 at 48 kHz): narrowband
    # SILK, which keeps the spectrum but not the waveform, so the channel's recording is
    # judged by short-time spectra
    route, published = await run_bridge(tmp_path, monkeypatch, options, waveform=False)
    encoder = route.encoders["bot"]
    assert [type(s) for s in encoder.stages] == [OpusEncoder]  # no resampler after the mix
    assert encoder.input == PCM16_8K and encoder.stages[0].input_rate == 8000
    assert encoder.stages[0].complexity == 1  # `complexity: auto` at 8 kHz (auto_complexity)
    assert encoder.stages[0].target_bitrate == 32000
    assert len(published) >= 100
    speech = [p for p in published if len(p) > 3]  # not the silence packets of the start and end
    assert speech and {packet_bandwidth(p) for p in speech} == {NB}


async def test_route_override_encodes_at_48k(tmp_path, monkeypatch):
    # the old default, still there when asked for: full band, which keeps the waveform
    route, published = await run_bridge(tmp_path, monkeypatch, ", opus_input_rate: 48000", waveform=True)
    encoder = route.encoders["bot"]
    assert encoder.input == PCM16_48K and encoder.stages[0].input_rate == 48000
    assert encoder.stages[0].complexity == 5  # `complexity: auto` above 8 kHz
    speech = [p for p in published if len(p) > 3]
    assert speech and {packet_bandwidth(p) for p in speech} == {FB}


# --- config ----------------------------------------------------------------------------------------

CONFIG = """
services:
  argon: {bot_token: bot-token-x}
routes:
  - name: r
    endpoints:
      - file: {path: /dev/null}
      - argon: {space_id: s, channel_id: c%s}
"""


def build(options: str = ""):
    gateway = Gateway(GatewayConfig.from_text(CONFIG % options, "gw.yaml"))
    gateway.build()
    return gateway.routes["r"].route.endpoints[1]


def test_argon_option_opus_input_rate():
    assert build().encoder_options["opus_input_rate"] is None  # the default: auto
    assert build(", opus_input_rate: auto").encoder_options["opus_input_rate"] is None
    assert build(", opus_input_rate: 48000").encoder_options["opus_input_rate"] == 48000
    assert build(", opus_input_rate: 8000").encoder_options["opus_input_rate"] == 8000
    assert build(", opus_input_rate: '24000'").encoder_options["opus_input_rate"] == 24000
    for bad in ("44100", "8k", "'48'"):
        with pytest.raises(ConfigError, match=r"gw\.yaml:8: routes\[0\]\.endpoints\[1\]\.argon\.opus_input_rate: "
                                              r"expected one of auto, 8000, 12000, 16000, 24000, 48000, got"):
            build(f", opus_input_rate: {bad}")


def test_argon_option_complexity():
    assert build().encoder_options["opus_complexity"] == "auto"  # the default
    assert build(", complexity: auto").encoder_options["opus_complexity"] == "auto"
    assert build(", complexity: 3").encoder_options["opus_complexity"] == 3
    assert build(", complexity: '0'").encoder_options["opus_complexity"] == 0
    with pytest.raises(ConfigError, match=r"argon\.complexity: expected auto or an integer 0-10, got 'fast'"):
        build(", complexity: fast")
    with pytest.raises(ConfigError, match=r"argon\.complexity: expected at most 10, got 11"):
        build(", complexity: 11")


# --- complexity auto ---------------------------------------------------------------------------

def pesq_nb(pcm8k: np.ndarray, *, loss: float, fec: bool, **options) -> float:
    """PESQ NB (ITU-T P.862) of 8 kHz speech through an 8 kHz-input Opus encoder and back:
    `loss` of the packets dropped (a fixed seed), each lost one rebuilt from the next
    packet's FEC when there is one (OpusDecoder.conceal), the decoded 48 kHz brought to 8 kHz
    and aligned on the encoder's lookahead."""
    from pesq import pesq  # a dev dependency (pyproject.toml)

    encoder = OpusEncoder(1, 20, input_rate=8000, fec=fec, **options)
    packets = [encoder.process(AudioFrame(np.ascontiguousarray(pcm8k[i : i + 160, None]), 8000, i))[0].payload
               for i in range(0, len(pcm8k) - 159, 160)]
    lost = np.random.default_rng(7).random(len(packets)) < loss
    decoder, out = OpusDecoder(1), []
    for i, packet in enumerate(packets):
        if not lost[i]:
            out += [f.pcm for f in decoder.process(EncodedFrame(packet, OPUS_48K, 960, 960 * i))]
        else:
            after = packets[i + 1] if i + 1 < len(packets) and not lost[i + 1] else None
            out.append(decoder.conceal(960, after).pcm)
    heard = soxr.resample(np.concatenate(out)[:, 0].astype(np.float64), 48000, 8000)  # zero phase
    heard = heard[encoder.delay // 6 :]  # the lookahead, 6.5 ms
    n = min(len(heard), len(pcm8k))
    return pesq(8000, pcm8k[:n].astype(np.float64), heard[:n], "nb")


def test_auto_complexity_is_1_at_8k_and_5_above_and_an_explicit_one_stays():
    assert OpusEncoder(1, 20, input_rate=8000, complexity="auto").complexity == 1
    for rate in (12000, 16000, 24000, 48000):
        assert OpusEncoder(1, 20, input_rate=rate, complexity="auto").complexity == 5
    assert OpusEncoder(1, 20, input_rate=8000, complexity=5).complexity == 5
    assert plan(PCMU_8K, OPUS_48K, ptime_ms=20, opus_complexity="auto").stages[-1].complexity == 1
    with pytest.raises(ValueError, match="complexity must be 0-10 or 'auto', got 'fast'"):
        OpusEncoder(1, 20, input_rate=8000, complexity="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(("fec", "loss"), [(True, 0.0), (True, 0.1), (False, 0.0)],
                         ids=["silk-fec", "silk-fec-10%-loss", "celt"])
def test_auto_complexity_at_8k_codes_speech_as_well_as_complexity_5_at_24_kbps(fec, loss):
    # complexity 1 costs half the CPU of 5 (bench/README.md, twelfth measurement); its 32 kb/s
    # floor is what buys the quality back: at 24 kb/s complexity 1 scores ~0.1 lower. With
    # FEC (the Argon dial's default) under loss; CELT (no FEC: an Argon listen channel, whose
    # bots hear it over TCP) without: under loss with no FEC at all it scores 0.03 lower.
    for name in ("or105.wav", "or109.wav"):
        pcm, rate = read_wav(ASSETS / name)
        assert rate == 8000
        before = pesq_nb(pcm[:, 0], loss=loss, fec=fec, complexity=5, bitrate=24000)
        now = pesq_nb(pcm[:, 0], loss=loss, fec=fec, complexity="auto")
        cheap = pesq_nb(pcm[:, 0], loss=loss, fec=fec, complexity=1, bitrate=24000)
        assert now >= before - 0.02, (name, now, before)
        assert cheap < now - 0.05, (name, cheap, now)  # the floor matters
