"""Per-session queue policies of the web page, on a fake clock: latest-frame-wins buffer, output pacing, input rate
limiting, latency stats, the session's start/stop/restart rules, bad driving frames and reference cropping."""

import threading

import numpy as np
import pytest
from PIL import Image

from personalive.errors import NoFaceError
from personalive.server.session import (
    FrameBuffer,
    Pacer,
    RateLimiter,
    Session,
    Stamp,
    StreamStats,
    as_rgb_frame,
    crop_around,
    prepare_reference,
)


def frame(value: int = 0, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


# ---------------------------------------------------------------------------------------------------- FrameBuffer
def test_buffer_takes_frames_evenly_spaced_up_to_the_newest_and_counts_drops():
    buffer = FrameBuffer(16)
    drops = [buffer.push(frame(i), stamp=float(i), now=float(i)) for i in range(10)]
    assert drops == [False] * 10 and len(buffer) == 10
    chunk = buffer.take(4, timeout=0)  # the first step: from the oldest to the newest frame
    assert chunk.stamps == [0.0, 3.0, 6.0, 9.0]
    assert chunk.frames.shape == (4, 8, 8, 3) and chunk.frames[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    assert len(buffer) == 0 and buffer.dropped == 6 and buffer.pushed == 10
    for i in range(10, 18):
        buffer.push(frame(i), float(i), now=float(i))
    assert buffer.take(4, timeout=0).stamps == [11.0, 13.0, 15.0, 17.0]  # (9, 17] in four equal parts
    assert buffer.dropped == 10


def test_buffer_never_grows_past_its_capacity():
    buffer = FrameBuffer(4)
    sizes = []
    for i in range(1000):
        buffer.push(frame(), float(i), now=float(i))
        sizes.append(len(buffer))
    assert max(sizes) == 4 and buffer.dropped == 996


def test_buffer_take_waits_for_a_full_chunk():
    buffer = FrameBuffer(4)
    for i in range(3):
        buffer.push(frame(i), float(i))
    assert buffer.take(4, timeout=0.01) is None  # not enough frames: nothing is taken
    assert len(buffer) == 3
    threading.Timer(0.05, buffer.push, args=(frame(3), 3.0)).start()
    chunk = buffer.take(4, timeout=5)
    assert chunk is not None and chunk.stamps == [0.0, 1.0, 2.0, 3.0]


def test_buffer_clear_is_not_a_drop():
    buffer = FrameBuffer(2)
    buffer.push(frame(), 0.0)
    buffer.clear()
    assert len(buffer) == 0 and buffer.dropped == 0
    with pytest.raises(ValueError):
        buffer.take(3)


# ---------------------------------------------------------------------------------------------------------- Pacer
def run_pacer(pacer: Pacer, pushes: list[float], until: float, poll: float = 0.005) -> list[float]:
    """Push a chunk of 4 at each time in `pushes`, poll every `poll` s; returns the times frames were shown."""
    shown, now, pending, sizes = [], 0.0, sorted(pushes), []
    while now < until:
        while pending and pending[0] <= now:
            pacer.push([pending.pop(0)] * 4, now)
        if pacer.pop(now) is not None:
            shown.append(now)
        sizes.append(len(pacer))
        now = round(now + poll, 6)
    assert max(sizes) <= pacer.max_frames
    return shown


def test_pacer_spreads_each_chunk_over_the_chunk_period():
    pacer = Pacer(4, period=1.0)
    shown = run_pacer(pacer, pushes=[float(t) for t in range(10)], until=10.5)
    assert len(shown) == 40
    gaps = np.diff(shown)
    assert gaps.min() > 0.2 and gaps.max() < 0.3  # one frame every ~0.25 s, never 4 at once


def test_pacer_follows_the_measured_chunk_period():
    pacer = Pacer(4, period=1.0)  # first guess 1 s, chunks really come every 0.4 s
    shown = run_pacer(pacer, pushes=[0.4 * k for k in range(20)], until=8.5)
    gaps = np.diff(shown[20:])  # after the moving average has settled
    assert abs(float(np.median(gaps)) - 0.1) < 0.02
    assert gaps.min() > 0.05


def test_pacer_with_jittery_chunks_stays_smooth_and_bounded():
    rng = np.random.default_rng(0)
    pushes = np.cumsum(rng.uniform(0.6, 1.4, size=30)).tolist()  # 1 s on average, +-40 %
    pacer = Pacer(4, period=1.0)
    shown = run_pacer(pacer, pushes=pushes, until=pushes[-1] + 2)
    gaps = np.diff(shown)
    assert len(shown) + pacer.dropped == 4 * len(pushes)
    assert np.mean(gaps < 0.05) < 0.05  # (almost) never a burst
    assert pacer.dropped <= 8


def test_pacer_drops_the_oldest_beyond_two_chunks():
    pacer = Pacer(4, period=1.0)
    for k in range(3):
        pacer.push([(k, i) for i in range(4)], now=0.0)
    assert len(pacer) == 8 and pacer.dropped == 4
    assert pacer.pop(0.0) == (1, 0)
    assert pacer.pop(0.0) is None  # the next is not due yet
    assert 0 < pacer.wait_time(0.0) <= 1.0 / 4


def test_pacer_clear_resets_the_period():
    pacer = Pacer(4, period=1.0)
    pacer.push([0] * 4, 0.0)
    pacer.push([0] * 4, 0.2)
    assert pacer.period < 1.0
    pacer.clear()
    assert len(pacer) == 0 and pacer.period == 1.0 and pacer.wait_time(0.0) is None


# ---------------------------------------------------------------------------------------------------- RateLimiter
def test_rate_limiter_samples_at_the_driving_fps_without_drift():
    limiter = RateLimiter(16)
    arrivals = [i / 30 for i in range(300)]  # a 30 fps camera for 10 s
    accepted = [t for t in arrivals if limiter.accept(t)]
    assert abs(len(accepted) - 160) <= 2
    assert np.diff(accepted).min() >= 1 / 30 - 1e-9


def test_rate_limiter_restarts_after_a_pause_instead_of_bursting():
    limiter = RateLimiter(10)
    assert limiter.accept(0.0) and not limiter.accept(0.05) and limiter.accept(0.1)
    assert limiter.accept(5.0)  # after a pause: accepted, and the schedule restarts from here
    assert not limiter.accept(5.01) and not limiter.accept(5.05) and limiter.accept(5.1)
    with pytest.raises(ValueError):
        limiter.fps = 0


# ---------------------------------------------------------------------------------------------------- StreamStats
def test_stats_percentiles_and_fps():
    stats = StreamStats()
    assert stats.latency() is None and stats.fps(0.0) == 0.0
    for i in range(100):
        stats.shown(now=i * 0.1, latency=None if i < 12 else (i - 12) / 1000)  # ramp frames have no latency
    p50, p95 = stats.latency()
    values = np.arange(88) / 1000
    assert p50 == pytest.approx(np.percentile(values, 50)) and p95 == pytest.approx(np.percentile(values, 95))
    assert stats.fps(now=9.9) == pytest.approx(10.0)
    for i in range(50):
        stats.arrived(now=i * 0.05)
    assert stats.input_fps(now=2.45) == pytest.approx(20.0) and stats.input_fps(now=10.0) == 0.0
    assert stats.frames == 100
    stats.reset()
    assert stats.latency() is None and stats.frames == 0


# -------------------------------------------------------------------------------------------------------- Session
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


def test_as_rgb_frame_converts_grey_alpha_and_float():
    assert as_rgb_frame(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert as_rgb_frame(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    assert as_rgb_frame(np.ones((5, 6, 3), np.float32)).max() == 255
    with pytest.raises(ValueError, match="shape"):
        as_rgb_frame(np.zeros((5, 6, 3, 1), np.uint8))


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


# ---------------------------------------------------------------------------------------------------- references
class FixedFaces:
    available = True

    def __init__(self, box):
        self._box = box

    def box(self, frame):
        return self._box


def test_crop_around_keeps_the_face_in_a_tall_portrait():
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[20:60, 30:70] = 255  # the "face", near the top
    centred = crop_around(tall, 50, 50)  # middle crop: rows 100..200, no face
    around = crop_around(tall, 50, 50, center=(50, 40))  # rows 0..100: the face
    assert centred.shape == around.shape == (50, 50, 3)
    assert centred.max() == 0 and around.mean() > 30
    wide = crop_around(np.zeros((100, 300, 3), np.uint8), 64, 64, center=(290, 50))  # clamped to the edge
    assert wide.shape == (64, 64, 3)


def test_prepare_reference_crops_around_the_face_or_refuses():
    image = Image.new("RGB", (120, 60))
    out = prepare_reference(image, 32, 32, FixedFaces((90, 10, 110, 30)))
    assert out.size == (32, 32)
    with pytest.raises(NoFaceError, match="no face"):
        prepare_reference(image, 32, 32, FixedFaces(None))
    assert prepare_reference(image, 32, 32, None).size == (32, 32)  # no face finder: middle crop


@pytest.mark.slow
def test_prepare_reference_with_mediapipe_on_the_sample_portrait():
    pytest.importorskip("mediapipe")
    from personalive.io.images import load_image
    from personalive.io.samples import sample_reference
    from personalive.server.session import FaceFinder

    faces = FaceFinder()
    try:
        assert prepare_reference(load_image(sample_reference()), 64, 64, faces).size == (64, 64)
        with pytest.raises(NoFaceError):
            prepare_reference(Image.new("RGB", (128, 128), "gray"), 64, 64, faces)
    finally:
        faces.close()
