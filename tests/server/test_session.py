"""A web session on a fake clock: start/stop/restart rules, bad driving frames, output pacing and latency."""

import numpy as np
import pytest
from PIL import Image

from personalive.server.pacing import Stamp
from personalive.server.session import Session


def frame(value: int = 0, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def new_session(**kwargs) -> Session:
    options = dict(height=16, width=16, window=4, fps=10, seed=3, idle_timeout=2.0) | kwargs
    return Session("test-session", **options)


def test_session_ignores_webcam_frames_until_a_reference_is_fused():
    s = new_session()
    s.push_webcam(frame(), now=0.0)
    assert len(s.inputs) == 0 and "reference" in s.notice and not s.wants_stream(0.0)
    s.set_reference(Image.new("RGB", (16, 16)))
    s.push_webcam(frame(), now=0.1)
    assert len(s.inputs) == 1 and s.source == "webcam" and s.wants_stream(0.2)


def test_session_fits_odd_frames_and_skips_bad_ones():
    s = new_session()
    s.set_reference(Image.new("RGB", (16, 16)))
    odd = [frame(h=480, w=640), frame(h=640, w=480), frame(h=1, w=1), np.zeros((30, 20), np.uint8),
           np.zeros((12, 12, 4), np.uint8), np.random.rand(20, 20, 3).astype(np.float32)]
    for i, f in enumerate(odd):
        s.push_webcam(f, now=i * 0.5)
    assert len(s.inputs) == 6 and s.inputs.dropped == 0
    chunk = s.inputs.take(4, timeout=0)
    assert chunk.frames.shape == (4, 16, 16, 3) and chunk.frames.dtype == np.uint8 and s.inputs.dropped == 2
    assert s.rejected == 0
    for i, bad in enumerate(["not a frame", np.zeros((4, 4, 2), np.uint8), np.zeros((0, 5, 3), np.uint8)]):
        s.push_webcam(bad, now=3.0 + i * 0.5)
    assert s.rejected == 3 and "skipped" in s.notice
    s.push_webcam(frame(h=32, w=24), now=4.5)  # the stream goes on
    assert len(s.inputs) == 1


def test_session_rate_limits_webcam_frames_to_the_driving_fps():
    s = new_session(fps=10)
    s.set_reference(Image.new("RGB", (16, 16)))
    for i in range(30):  # 30 fps for 1 s
        s.push_webcam(frame(), now=i / 30)
    assert s.inputs.pushed == 10 and (s.received, s.limited) == (30, 20)  # every frame is counted
    s.set_fps(30)
    for i in range(30):
        s.push_webcam(frame(), now=1.0 + i / 30)
    assert abs(s.inputs.pushed - 40) <= 1


def test_session_stop_start_and_idle_webcam():
    s = new_session()
    s.set_reference(Image.new("RGB", (16, 16)))
    s.push_webcam(frame(), now=0.0)
    assert s.wants_stream(0.5)
    s.stop()
    s.push_webcam(frame(), now=0.6)
    assert not s.wants_stream(0.7) and len(s.inputs) == 0  # Stop: webcam frames are ignored
    s.start()
    s.push_webcam(frame(), now=0.8)
    assert s.wants_stream(0.9)
    assert not s.wants_stream(0.8 + 2.5)  # no webcam frame for longer than idle_timeout: stream over
    assert s.source is None


def test_session_restarts_on_a_new_reference_and_discards_old_output():
    s = new_session()
    s.set_reference(Image.new("RGB", (16, 16)))
    epoch = s.epoch
    s.deliver(np.zeros((4, 16, 16, 3), np.uint8), [None] * 4, epoch, step_time=0.1, now=0.0)
    assert len(s.pacer) == 4
    s.set_reference(Image.new("RGB", (16, 16), "white"))
    assert s.epoch == epoch + 1 and len(s.pacer) == 0
    s.deliver(np.zeros((4, 16, 16, 3), np.uint8), [None] * 4, epoch, step_time=0.1, now=0.1)  # a late step
    assert len(s.pacer) == 0
    s.set_seed(7)
    assert s.stream_spec()[2] == 7


def test_session_output_latency_and_readout():
    s = new_session()
    s.set_reference(Image.new("RGB", (16, 16)))
    s.deliver(np.zeros((4, 16, 16, 3), np.uint8), [Stamp(1.0 + i / 10) for i in range(4)], s.epoch, step_time=0.25,
              now=2.0)
    shown, now = [], 2.0
    while len(shown) < 4:
        if (out := s.next_output(now)) is not None:
            shown.append(out)
        now += 0.01
    assert [o.index for o in shown] == [1, 2, 3, 4]
    assert all(isinstance(o.jpeg, str) and len(o.jpeg) > 100 for o in shown)
    p50, _ = s.stats.latency()
    assert 0.9 < p50 < 1.5
    text = s.stats_text(now)
    assert "driving **0.0** fps" in text and "latency in server p50 **" in text
    assert "engine step **250** ms" in text and "dropped **0**" in text


def test_session_stamps_webcam_frames_with_their_capture_time_and_video_frames_without():
    s = new_session(fps=30)
    s.set_reference(Image.new("RGB", (16, 16)))
    for i in range(4):
        s.push_webcam(frame(i), now=1.0 + i / 10, captured=5000.0 + 100 * i)  # browser clock, ms
    chunk = s.inputs.take(4, timeout=0)
    assert chunk.stamps == [Stamp(1.0 + i / 10, 5000.0 + 100 * i) for i in range(4)]
    s.deliver(chunk.frames, [None, None, *chunk.stamps[:2]], s.epoch, step_time=0.1, now=2.0)
    shown, now = [], 2.0
    while len(shown) < 4:
        if (out := s.next_output(now)) is not None:
            shown.append(out)
        now += 0.01
    assert [o.stamp and o.stamp.captured for o in shown] == [None, None, 5000.0, 5100.0]
    assert s.stats.latency()[0] == pytest.approx(now - 1.05, abs=0.05)  # in server: from arrival, not capture

    s.source = "video"  # as play_video sets it
    s.push_video_frame(frame(), now=3.0)
    assert s.inputs.take(1, timeout=0).stamps == [Stamp(3.0, None)]  # read on the server: no browser capture


def test_session_failure_stops_the_stream_until_restart():
    s = new_session()
    s.set_reference(Image.new("RGB", (16, 16)))
    s.push_webcam(frame(), now=0.0)
    s.fail(s.epoch - 1, "old")  # a failure of an older epoch is ignored
    assert s.error is None
    s.fail(s.epoch, "no face found")
    assert not s.wants_stream(0.1) and s.notice == "no face found"
    s.restart()
    assert s.error is None
