"""Headless Chromium for tests: a real browser runs a web page against the gateway.

- `require_chromium()`: the Debian `chromium` binary, or a skip (a failure when the environment
  sets GATEWAY_REQUIRE_BROWSER).
- `serve_page()`: serves one HTML page on its own loopback port, so the page's origin differs
  from the gateway's (its REST calls go through a real CORS preflight).
- `fake_mic_wav()`: a WAV for Chromium's fake microphone (it plays the file in a loop).
- `Browser`: Chromium driven by Playwright (`executable_path`, no `playwright install`), with a
  fake microphone and an init script that records, inside the page and without changing it,
  what the page plays and what it sends (`CAPTURE_JS`, read back with `Browser.capture()`).

Playwright's sync API belongs to the thread that started it, so each `Browser` owns one worker
thread; trio code calls into it with `await browser.call(fn, *args)` (`fn(page, *args)` runs in
that thread while trio waits in `trio.to_thread.run_sync`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import attrs
import numpy as np
import pytest
import soxr
import trio
from playwright.sync_api import Page, sync_playwright

from audio_checks import read_wav, write_wav
from gateway.server import HttpResponse, HttpServer, serve_http

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (./dev.sh installs it when missing)
REQUIRE_ENV = "GATEWAY_REQUIRE_BROWSER"
CAPTURE_RATE = 16000  # Hz of the audio read back from the page (the spec's page plays 16 kHz)

# Everything that would reach out of a closed network is off; media permissions are granted
# without a prompt and the microphone is a file; audio may start without a user gesture.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
)


def require_chromium() -> Path:
    """The Chromium binary; skips the test when it is missing, unless GATEWAY_REQUIRE_BROWSER is
    set (CI: `./dev.sh test` installs it, so a missing browser there is a failure)."""
    if CHROMIUM.exists():
        return CHROMIUM
    reason = f"{CHROMIUM} is missing (Debian package chromium; ./dev.sh setup installs it)"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set")
    pytest.skip(reason)


async def serve_page(nursery: trio.Nursery, html: str, path: str = "/") -> str:
    """Serve `html` at http://127.0.0.1:<port><path> until the nursery ends; returns the URL."""
    app = HttpServer()
    body = html.encode()

    async def page(request):
        return HttpResponse(200, body, "text/html; charset=utf-8", (("cache-control", "no-store"),))

    async def no_icon(request):
        return HttpResponse(204, b"", "image/x-icon")

    app.add("GET", path, page)
    app.add("GET", "/favicon.ico", no_icon)
    port = await nursery.start(serve_http, app, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}{path}"


def fake_mic_wav(source: Path, out: Path, *, start_s: float = 0.0, seconds: float | None = None,
                 rate: int = 48000) -> tuple[np.ndarray, int]:
    """Cut `seconds` of `source` from `start_s`, resample to `rate` (mono PCM16) and write it
    to `out` for --use-file-for-fake-audio-capture. Returns (the clip as written, rate)."""
    pcm, src_rate = read_wav(source)
    mono = pcm.astype(np.float64).mean(axis=1)
    end = None if seconds is None else int((start_s + seconds) * src_rate)
    mono = mono[int(start_s * src_rate) : end]
    if src_rate != rate:
        mono = soxr.resample(mono, src_rate, rate, quality="VHQ")
    clip = np.clip(np.rint(mono), -32768, 32767).astype(np.int16)
    write_wav(out, clip, rate)
    return clip, rate


# The page's audio, recorded in the page. Wrapped, not replaced: every call goes through.
# - AudioBufferSourceNode.start(when): the buffer's samples, `when`, the context's currentTime
#   and the wall clock (performance.now) - the page's playout schedule.
# - AudioNode.connect(ctx.destination) from a buffer source: also connected to a tap (a
#   ScriptProcessor on that context) that records what the context actually renders.
# - WebSocket: text messages received, binary messages and bytes sent, close code.
CAPTURE_JS = r"""
(() => {
  const cap = window.__capture = {
    played: [], taps: [], texts: [], sentFrames: 0, sentBytes: 0, firstSent: null, lastSent: null,
    closes: [], errors: [], sockets: 0, contexts: [],
  };
  // How long each AudioContext took to construct (ms): Chromium's first one opens the audio
  // output and holds the page's main thread meanwhile (messages queue; see Browser.warm_audio).
  const NativeAudioContext = window.AudioContext;
  window.AudioContext = class extends NativeAudioContext {
    constructor(...args) {
      const t0 = performance.now();
      super(...args);
      cap.contexts.push(performance.now() - t0);
    }
  };
  const start = AudioBufferSourceNode.prototype.start;
  AudioBufferSourceNode.prototype.start = function (when = 0, ...rest) {
    const b = this.buffer;
    if (b) cap.played.push({
      when, now: this.context.currentTime, wall: performance.now(), rate: b.sampleRate,
      data: new Float32Array(b.getChannelData(0)),
    });
    return start.call(this, when, ...rest);
  };
  const connect = AudioNode.prototype.connect;
  function tap(ctx) {
    if (!ctx.__tap) {
      const bus = ctx.createGain();
      const proc = ctx.createScriptProcessor(1024, 1, 1);
      const t = {rate: ctx.sampleRate, chunks: [], firstWall: null, state: () => ctx.state};
      proc.onaudioprocess = (e) => {
        if (t.firstWall === null) t.firstWall = performance.now();
        t.chunks.push({time: e.playbackTime, data: new Float32Array(e.inputBuffer.getChannelData(0))});
      };
      connect.call(bus, proc);
      connect.call(proc, ctx.destination);  // a ScriptProcessor runs only when connected; it outputs silence
      ctx.__tap = {bus, t};
      cap.taps.push(t);
    }
    return ctx.__tap.bus;
  }
  AudioNode.prototype.connect = function (dest, ...rest) {
    const result = connect.call(this, dest, ...rest);
    if (this instanceof AudioBufferSourceNode && dest === this.context.destination) connect.call(this, tap(this.context));
    return result;
  };
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      cap.sockets++;
      this.addEventListener('message', (e) => { if (typeof e.data === 'string') cap.texts.push(e.data); });
      this.addEventListener('close', (e) => cap.closes.push({code: e.code, reason: e.reason, wall: performance.now()}));
    }
    send(data) {
      if (typeof data !== 'string') {
        cap.sentFrames++;
        cap.sentBytes += data.byteLength;
        cap.lastSent = performance.now();
        if (cap.firstSent === null) cap.firstSent = cap.lastSent;
      }
      return super.send(data);
    }
  };
  window.addEventListener('error', (e) => cap.errors.push(String(e.message)));
  window.addEventListener('unhandledrejection', (e) => cap.errors.push(String(e.reason)));
})();
"""

# Opens Chromium's audio output once (Browser.warm_audio); not recorded in the capture.
WARM_AUDIO_JS = r"""
async () => {
  const t0 = performance.now();
  const ctx = new AudioContext({sampleRate: 16000});
  const took = performance.now() - t0;
  window.__capture.contexts.pop();
  if (ctx.state === 'suspended') await ctx.resume();
  await ctx.close();
  return took;
}
"""

# Reads the capture back as JSON-friendly values (audio as base64 little-endian float32).
READ_CAPTURE_JS = r"""
() => {
  const cap = window.__capture;
  const b64 = (f32) => {
    const bytes = new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
    let s = '';
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  };
  const join = (parts) => {
    const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let off = 0;
    for (const p of parts) { out.set(p, off); off += p.length; }
    return out;
  };
  const tap = cap.taps[0];
  return {
    played: cap.played.map(p => ({when: p.when, now: p.now, wall: p.wall, rate: p.rate, samples: p.data.length})),
    playedAudio: b64(join(cap.played.map(p => p.data))),
    tapRate: tap ? tap.rate : null,
    tapStart: tap && tap.chunks.length ? tap.chunks[0].time : null,
    tapAudio: tap ? b64(join(tap.chunks.map(c => c.data))) : '',
    tapState: tap ? tap.state() : null,
    texts: cap.texts, sentFrames: cap.sentFrames, sentBytes: cap.sentBytes,
    firstSent: cap.firstSent, lastSent: cap.lastSent, closes: cap.closes, errors: cap.errors,
    sockets: cap.sockets, contexts: cap.contexts, now: performance.now(),
  };
}
"""


def _floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def _pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)


@attrs.frozen
class Played:
    """One buffer the page scheduled: `when` (AudioContext seconds), the context's `now` at
    that moment, `wall` (ms, performance.now) and its length."""

    when: float
    now: float
    wall: float
    rate: int
    samples: int

    @property
    def duration(self) -> float:
        return self.samples / self.rate


@attrs.frozen
class Capture:
    """What the page did, recorded in the page."""

    played: list[Played]
    played_pcm: np.ndarray
    """Every buffer the page scheduled, back to back, PCM16 at `CAPTURE_RATE`."""
    tap_pcm: np.ndarray
    """What the page's playback context rendered (from its first buffer on), PCM16."""
    tap_rate: int | None
    tap_state: str | None
    tap_start: float | None
    """AudioContext time of the tap's first rendered sample (None: nothing rendered)."""
    texts: list[str]
    sent_frames: int
    sent_bytes: int
    sent_span_s: float
    """Wall seconds between the first and the last binary message the page sent."""
    closes: list[dict]
    errors: list[str]
    sockets: int
    contexts_ms: list[float]
    """How long each AudioContext the page created took to construct (ms), in order."""

    def schedule(self) -> dict[str, float]:
        """The page's playout schedule in numbers: `audio_s` played, `wall_s` between the
        first and the last buffer's arrival, `span_s` from the first start to the last end,
        `gaps_s` of silence the schedule left between buffers (underruns), `max_gap_s`, and
        `max_lead_s`, how far ahead of the context's clock a buffer was queued."""
        if not self.played:
            return {"buffers": 0, "audio_s": 0.0, "wall_s": 0.0, "span_s": 0.0, "gaps_s": 0.0, "max_gap_s": 0.0, "max_lead_s": 0.0}
        gaps = [max(0.0, b.when - (a.when + a.duration)) for a, b in zip(self.played, self.played[1:])]
        return {
            "buffers": len(self.played),
            "audio_s": sum(p.duration for p in self.played),
            "wall_s": (self.played[-1].wall - self.played[0].wall) / 1000 + self.played[-1].duration,
            "span_s": self.played[-1].when + self.played[-1].duration - self.played[0].when,
            "gaps_s": sum(gaps),
            "max_gap_s": max(gaps, default=0.0),
            "max_lead_s": max(p.when - p.now for p in self.played),
        }

    def scheduled_pcm(self) -> np.ndarray:
        """The buffers placed on the playback context's timeline at their `when` (silence in
        the gaps), from the first buffer's start: what the schedule plays, PCM16."""
        if not self.played:
            return np.zeros(0, np.int16)
        t0 = self.played[0].when
        end = max(round((p.when - t0) * CAPTURE_RATE) + p.samples for p in self.played)
        out = np.zeros(end, np.int16)
        offset = 0
        for p in self.played:
            at = round((p.when - t0) * CAPTURE_RATE)
            out[at : at + p.samples] = self.played_pcm[offset : offset + p.samples]
            offset += p.samples
        return out


FIRST_START_S = 90.0  # budget for Chromium's first start (a fresh machine, a loaded one)


class Browser:
    """A headless Chromium with one page, driven from its own thread.

    `async with Browser(profile_dir, mic_wav) as browser:` launches it (fresh profile, fake
    microphone playing `mic_wav` in a loop, `CAPTURE_JS` in every document);
    `await browser.call(fn, *args)` runs `fn(page, *args)` in the browser's thread.
    Console messages and page errors are kept in `browser.console`.
    """

    def __init__(self, profile_dir: Path, mic_wav: Path, *, init_script: str = CAPTURE_JS,
                 timeout_s: float = 15.0) -> None:
        self.profile_dir = profile_dir
        self.mic_wav = mic_wav
        self.init_script = init_script
        self.timeout_s = timeout_s
        self.console: list[str] = []
        self.requests: dict[str, dict] = {}
        """Every request the page made, by DevTools request id: method, url, type, status, headers."""
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chromium")
        self._playwright = None
        self._context = None
        self.page: Page | None = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(page, *args)` in the browser's thread and return its result."""
        future = self._executor.submit(fn, self.page, *args)
        return await trio.to_thread.run_sync(future.result)

    def _launch(self, _page: None) -> None:
        binary = require_chromium()
        self._playwright = sync_playwright().start()
        self._context = self._playwright.chromium.launch_persistent_context(
            str(self.profile_dir),
            executable_path=str(binary),
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={self.mic_wav}"],
            ignore_default_args=["--mute-audio"],
        )
        self._context.set_default_timeout(self.timeout_s * 1000)
        self._context.add_init_script(self.init_script)
        self.page = self._context.pages[0] if self._context.pages else self._context.new_page()
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        # Playwright hides CORS preflights; the DevTools protocol shows them (type "Preflight")
        cdp = self._context.new_cdp_session(self.page)
        cdp.on("Network.requestWillBeSent", self._request)
        cdp.on("Network.responseReceived", self._response)
        cdp.send("Network.enable")
        self._cdp = cdp
        # Chromium's first start on a fresh machine (font and shader caches, the GPU and audio
        # utility processes) can take many seconds, more beside a busy test worker: let it
        # happen here, under its own budget, so the test's own deadlines measure the page.
        self.page.set_content("<!DOCTYPE html><p>warm-up: text, a frame</p>", timeout=FIRST_START_S * 1000)
        self.page.wait_for_function("() => document.fonts.status === 'loaded'", polling="raf",
                                    timeout=FIRST_START_S * 1000)

    def _request(self, event: dict) -> None:
        request = event["request"]
        self.requests[event["requestId"]] = {"method": request["method"], "url": request["url"],
                                             "type": event.get("type"), "status": None, "headers": {}}

    def _response(self, event: dict) -> None:
        seen = self.requests.get(event["requestId"])
        if seen is not None:
            seen["status"] = event["response"]["status"]
            seen["headers"] = {k.lower(): v for k, v in event["response"]["headers"].items()}

    def _close(self, _page: Page | None) -> None:
        try:
            if self._context is not None:
                self._context.close()
        finally:
            if self._playwright is not None:
                self._playwright.stop()

    async def __aenter__(self) -> Self:
        try:
            await self.call(self._launch)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.call(self._close)
            finally:
                self._executor.shutdown(wait=False)

    async def warm_audio(self) -> float:
        """Open (and close) one AudioContext in the page, so that Chromium's audio output is up
        before the page under test creates its own: the first one ever takes 100-400 ms on a
        loaded machine, holding the page's main thread while WebSocket messages queue. Returns
        its construction time in ms."""
        return await self.call(lambda page: page.evaluate(WARM_AUDIO_JS))

    async def capture(self) -> Capture:
        """Read back what the page played and sent (`CAPTURE_JS`)."""
        raw = await self.call(lambda page: page.evaluate(READ_CAPTURE_JS))
        played = [Played(**p) for p in raw["played"]]
        rates = {p.rate for p in played}
        assert rates <= {CAPTURE_RATE}, f"the page played buffers at {rates} Hz"
        first, last = raw["firstSent"], raw["lastSent"]
        return Capture(
            played=played,
            played_pcm=_pcm16(_floats(raw["playedAudio"])),
            tap_pcm=_pcm16(_floats(raw["tapAudio"])) if raw["tapAudio"] else np.zeros(0, np.int16),
            tap_rate=raw["tapRate"],
            tap_state=raw["tapState"],
            tap_start=raw["tapStart"],
            texts=raw["texts"],
            sent_frames=raw["sentFrames"],
            sent_bytes=raw["sentBytes"],
            sent_span_s=(last - first) / 1000 if first is not None else 0.0,
            closes=raw["closes"],
            errors=raw["errors"],
            sockets=raw["sockets"],
            contexts_ms=raw["contexts"],
        )
