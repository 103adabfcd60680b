"""Queue policies of a live stream, on a fake clock: latest-frame-wins buffer, output pacing, input rate limiting,
latency stats."""

import threading

import numpy as np
import pytest

from personalive.server.pacing import FrameBuffer, Pacer, RateLimiter, StreamStats


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
