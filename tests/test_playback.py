"""The kit's playout queue (gateway/adapters/playback.py: what Twilio does with a server's
audio), driven by `now` without an event loop: real-time playout of bursts, marks echoed when
their audio has played, clear (barge-in), idling, the bound, and a PCM16 format."""

from __future__ import annotations

import pytest

from gateway.adapters.playback import FRAME_BYTES, PTIME_S, Playback


def tone(n: int, start: int = 0) -> bytes:
    return bytes((start + i) % 256 for i in range(n))


def drain(playback: Playback, until: float) -> list[tuple[float, list[bytes], list[str]]]:
    """Pop at every due time up to `until`: [(time, frames, marks)]."""
    out = []
    while (due := playback.next_due()) is not None and due <= until:
        frames, marks = playback.pop(due)
        out.append((due, frames, marks))
    return out


def test_a_burst_plays_at_real_time_one_frame_per_ptime():
    playback = Playback()
    audio = tone(8000)  # 1 s, arriving at once (a bot's text to speech)
    playback.push(audio, 10.0)
    steps = drain(playback, 20.0)
    assert len(steps) == 50
    assert [round(t - 10.0, 6) for t, _, _ in steps] == [round(i * PTIME_S, 6) for i in range(50)]
    assert all(len(frames) == 1 and len(frames[0]) == FRAME_BYTES for _, frames, _ in steps)
    assert b"".join(f for _, frames, _ in steps for f in frames) == audio  # every byte once, in order
    assert playback.next_due() is None and playback.queued_bytes == 0


def test_a_late_pop_catches_up_and_nothing_plays_early():
    playback = Playback()
    playback.push(tone(1600), 0.0)
    assert playback.pop(-0.001) == ([], [])
    frames, _ = playback.pop(0.065)  # the task woke 65 ms late: the four frames due by then
    assert len(frames) == 4
    assert playback.next_due() == pytest.approx(0.08)


def test_marks_come_back_once_the_audio_before_them_has_played():
    playback = Playback()
    playback.push(tone(800), 0.0)  # 100 ms
    playback.mark("first", 0.0)
    playback.push(tone(400), 0.01)  # 50 ms more
    playback.mark("second", 0.01)
    marks = [(round(t, 3), m) for t, _, ms in drain(playback, 1.0) for m in ms]
    assert marks == [(0.1, "first"), (0.15, "second")]  # when the frame holding its last byte has ended


def test_a_mark_with_nothing_queued_comes_back_when_the_frame_playing_ends():
    playback = Playback()
    playback.mark("idle", 5.0)
    assert playback.next_due() == 5.0 and playback.pop(5.0) == ([], ["idle"])
    playback.push(tone(160), 6.0)
    assert playback.pop(6.0)[0] == [tone(160)]  # playing until 6.02
    playback.mark("after", 6.005)
    assert playback.pop(6.01) == ([], [])
    assert playback.pop(6.02) == ([], ["after"])


def test_clear_drops_the_queue_and_returns_every_waiting_mark():
    playback = Playback()
    playback.push(tone(8000), 0.0)
    playback.mark("a", 0.0)
    playback.push(tone(800), 0.0)
    playback.mark("b", 0.0)
    frames, _ = playback.pop(0.0)
    assert len(frames) == 1
    dropped, marks = playback.clear()
    assert (dropped, marks) == (8800 - 160, ["a", "b"])
    assert playback.queued_bytes == 0 and playback.marks_waiting == 0 and playback.next_due() is None
    # the frame handed out plays on until 0.02: new audio follows it back to back
    playback.push(tone(160, 7), 0.005)
    assert playback.next_due() == pytest.approx(0.02)


def test_an_underrun_idles_and_the_next_push_starts_at_its_arrival():
    playback = Playback()
    playback.push(tone(160), 0.0)
    playback.pop(0.0)
    assert playback.next_due() is None
    assert playback.pop(0.5) == ([], [])  # idle: nothing, and the run is over
    playback.push(tone(160), 3.0)
    assert playback.next_due() == 3.0


def test_short_pieces_join_into_whole_frames_and_a_run_ends_with_a_short_one():
    playback = Playback()
    playback.push(tone(100), 0.0)
    playback.push(tone(100, 100), 0.0)  # 200 bytes: one frame and 40 bytes
    frames, _ = playback.pop(0.0)
    assert frames == [tone(160)]
    frames, _ = playback.pop(0.02)
    assert frames == [tone(40, 160)]  # what is left, as a shorter frame: no sample added or lost
    assert playback.next_due() is None
    playback.push(tone(160), 0.021)  # follows the 5 ms frame still playing (until 0.025)
    assert playback.next_due() == pytest.approx(0.025)


def test_the_bound_keeps_what_fits_and_counts_the_rest():
    playback = Playback(max_bytes=1000)
    playback.push(tone(600), 0.0)
    playback.push(tone(600), 0.0)
    assert playback.queued_bytes == 1000 and playback.dropped_bytes == 200
    playback.push(tone(10), 0.0)
    assert playback.dropped_bytes == 210
    assert playback.queued_ms == 125


def test_pcm16_frames_are_the_formats_size_and_play_at_its_rate():
    """PCM16 8 kHz: 320 bytes per 20 ms; 1 s of it plays in 1 s, its mark due at the end."""
    playback = Playback(frame_bytes=320, bytes_per_s=16000)
    playback.push(tone(16000), 0.0)
    playback.mark("end", 0.0)
    got = drain(playback, 2.0)
    frames = [f for _, fs, _ in got for f in fs]
    assert {len(f) for f in frames} == {320} and b"".join(frames) == tone(16000)
    assert [round(t, 6) for t, fs, _ in got if fs] == [round(k * 0.02, 6) for k in range(50)]
    assert [(round(t, 6), m) for t, _, ms in got for m in ms] == [(1.0, "end")]
    assert playback.max_bytes == 60 * 16000
    with pytest.raises(ValueError, match="positive"):
        Playback(frame_bytes=0)
