"""Frame selection under load, on a fake clock: a camera stamping its frames and a fake engine slower than it. Each
step takes frames evenly spaced in time since the previous step (within one camera frame while the buffer holds
the interval), the newest frame is always among them, and a bounded buffer still spans long intervals evenly."""

import numpy as np
import pytest

from personalive.server.pacing import FrameBuffer
from personalive.server.selection import pick_evenly, targets, thin

CAMERA_FPS = 30.0
WINDOW = 4


def run_slow_engine(step_time: float, capacity: int, seconds: float = 20.0) -> list[tuple[list[float], float]]:
    """A camera pushes frames stamped with their time (30 fps) into a FrameBuffer; a fake engine takes a chunk every
    `step_time` s. Returns, per step, the chosen stamps and the newest stamp pushed before the take."""
    buffer = FrameBuffer(capacity)
    steps, newest, next_step = [], None, step_time
    for i in range(int(seconds * CAMERA_FPS)):
        now = i / CAMERA_FPS
        if now >= next_step and len(buffer) >= WINDOW:
            steps.append((buffer.take(WINDOW, timeout=0).stamps, newest))
            next_step = now + step_time
        buffer.push(np.zeros((2, 2, 3), np.uint8), now, now)
        newest = now
    return steps


@pytest.mark.parametrize("step_time", [0.2, 0.3, 0.5])
def test_a_slow_engine_gets_evenly_spaced_frames_and_always_the_newest(step_time):
    period = 1 / CAMERA_FPS
    steps = run_slow_engine(step_time, capacity=16)  # up to 15 camera frames per step: nothing is thinned
    assert len(steps) > 10
    for (previous, _), (chosen, newest) in zip(steps, steps[1:], strict=False):
        assert chosen[-1] == newest  # latency does not grow
        ideal = targets(chosen, WINDOW, previous[-1])  # the interval since the previous step, in four parts
        assert all(abs(c - t) <= period / 2 + 1e-9 for c, t in zip(chosen, ideal, strict=True)), (previous, chosen)
        gaps = np.diff([previous[-1], *chosen])
        assert gaps.max() - gaps.min() <= period + 1e-9, gaps  # evenly spaced within one camera frame


def test_the_newest_four_frames_are_not_what_a_slow_engine_gets():
    # the old policy (newest 4) gave 4 consecutive camera frames, then a jump
    (_, _), (chosen, _) = run_slow_engine(0.5, capacity=16)[:2]
    assert np.diff(chosen).min() > 1.5 / CAMERA_FPS


def test_a_very_slow_engine_still_gets_frames_spread_over_its_interval():
    step_time, capacity = 3.0, 16  # 90 camera frames per step into a buffer of 16
    steps = run_slow_engine(step_time, capacity, seconds=40)
    for (previous, _), (chosen, newest) in zip(steps, steps[1:], strict=False):
        assert chosen[-1] == newest
        ideal = targets(chosen, WINDOW, previous[-1])
        # the buffer keeps an even sample with gaps of at most about 2 T / capacity; a pick is within half a gap
        errors = [abs(c - t) for c, t in zip(chosen, ideal, strict=True)]
        assert max(errors) <= step_time / capacity + 1e-9, (previous, chosen)


def test_pick_evenly_edges():
    times = [0.0, 1.0, 2.0, 3.0]
    assert pick_evenly(times, 4, since=None) == [0, 1, 2, 3]  # as many frames as the step takes: all of them
    assert pick_evenly(times, 4, since=-100.0) == [0, 1, 2, 3]  # distinct even when the targets crowd one end
    assert pick_evenly(times, 1, since=None) == [3]
    assert pick_evenly([0.0, 0.1, 0.2, 2.4, 5.0, 5.1], 3, since=None) == [0, 3, 5]  # nearest to 0, 2.55, 5.1
    with pytest.raises(ValueError, match="cannot pick 5 of 4"):
        pick_evenly(times, 5)


def test_thin_drops_where_frames_are_densest_never_the_newest():
    assert thin([0.0, 1.0, 1.1, 1.2, 3.0], since=None) == 2  # 1.0 .. 1.2 is the densest
    assert thin([0.0, 3.0], since=None) == 0  # nothing between the ends: the oldest goes
    assert thin([0.1, 0.2, 3.0], since=0.0) == 0  # after a step, the oldest frame is fair game
    assert thin([0.0, 1.0, 2.0, 3.0], since=None) == 1  # ties: the older frame
