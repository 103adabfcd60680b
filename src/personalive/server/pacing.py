"""Time-driven queue policies of a live stream: what a driving frame waits behind and when an output frame is shown.

The queue discipline decides the latency users feel, so every queue here is bounded:

- `FrameBuffer` holds the driving frames that arrived since the engine's last step (a few chunks at most); each
  step takes a chunk evenly spaced in time over that interval, ending with the newest frame (`selection.py`), and
  the rest are dropped (and counted), so a frame never waits behind a backlog and motion advances evenly.
- `Pacer` releases the engine's output chunks one frame at a time, spread over the measured time between chunks
  instead of 4 at once; it too holds at most two chunks.
- `RateLimiter` samples the webcam's frames at the driving FPS.
- `StreamStats` turns driving and shown frames into the page's readout: FPS in and out and latency percentiles,
  where latency runs from a driving frame's arrival at the server to its animated frame leaving for the page (the
  page itself measures capture to screen, from the browser `Stamp` each webcam frame carries through the engine).

Every method that depends on time takes `now` (seconds of `time.monotonic()`), so the policies are testable with a
fake clock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from personalive.server.selection import pick_evenly, thin


@dataclass(frozen=True)
class Stamp:
    """When a driving frame was taken: `arrived` at the server (s, `time.monotonic()`) and `captured` by the page
    (ms, the browser's clock; None for driving-video frames, which are read on the server)."""

    arrived: float
    captured: float | None = None


@dataclass
class Chunk:
    """Driving frames for one engine step: frames (n, H, W, 3) uint8 and their stamps (n,)."""

    frames: np.ndarray
    stamps: list[Stamp]


class FrameBuffer:
    """Bounded buffer of the driving frames since the engine's last step; a step takes frames evenly spaced in time
    over that interval, the newest always among them. Thread-safe.

    Args:
        capacity: frames kept at most; a push into a full buffer drops the frame whose loss leaves the smallest gap
            in time (`selection.thin`), so the buffer still spans the whole interval.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: list[tuple[np.ndarray, Stamp]] = []
        self._times: list[float] = []  # when each frame arrived (s), ascending
        self._since: float | None = None  # when the newest frame of the last step arrived
        self._cond = threading.Condition()
        self.dropped = 0  # frames that no step took
        self.pushed = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def push(self, frame: np.ndarray, stamp: Stamp, now: float | None = None) -> bool:
        """Add a frame (H, W, 3) uint8 taken at `stamp`, arriving at `now` (s, default: `time.monotonic()`); True
        when the buffer was full and dropped a frame for it."""
        with self._cond:
            self._items.append((frame, stamp))
            self._times.append(time.monotonic() if now is None else now)
            self.pushed += 1
            dropped = len(self._items) > self.capacity
            if dropped:
                i = thin(self._times, self._since)
                del self._items[i], self._times[i]
                self.dropped += 1
            self._cond.notify_all()
            return dropped

    def take(self, n: int, timeout: float | None = None) -> Chunk | None:
        """Wait (at most `timeout` s) for `n` frames, then take `n` evenly spaced in time over the interval since the
        last take (`selection.pick_evenly`), oldest first, the newest among them; the others are dropped. None on
        timeout."""
        if n > self.capacity:
            raise ValueError(f"cannot take {n} frames from a buffer of {self.capacity}")
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout):
                return None
            picked = pick_evenly(self._times, n, self._since)
            items = [self._items[i] for i in picked]
            self.dropped += len(self._items) - n
            self._since = self._times[picked[-1]]
            self._items.clear()
            self._times.clear()
        return Chunk(np.stack([frame for frame, _ in items]), [stamp for _, stamp in items])

    def clear(self) -> None:
        """Forget the buffered frames and the last step (a restart, not a drop)."""
        with self._cond:
            self._items.clear()
            self._times.clear()
            self._since = None
            self._cond.notify_all()


class Pacer:
    """Spreads output chunks evenly over time: one frame every (time between chunks) / (frames per chunk).

    The period between chunks is a moving average of their measured arrival gaps (initially `period`). When more
    than a chunk is queued (a late chunk followed by a prompt one) the interval shrinks so that the backlog drains
    within a period; more than `max_frames` queued frames drop the oldest. Not thread-safe: the owner locks.

    Args:
        frames_per_chunk: frames the engine returns per step; period: first guess of the time between chunks (s);
        max_frames: queued frames kept at most; smoothing: weight of a new gap in the moving average.
    """

    def __init__(self, frames_per_chunk: int, period: float, max_frames: int | None = None, smoothing: float = 0.3):
        self.frames_per_chunk = frames_per_chunk
        self.period = self.initial_period = period
        self.max_frames = max_frames or 2 * frames_per_chunk
        self.smoothing = smoothing
        self._queue: deque[Any] = deque()
        self._last_push: float | None = None
        self._next: float | None = None  # when the next frame is due
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, items: list[Any], now: float) -> None:
        """Queue a chunk of frames (any objects, oldest first) that arrived at `now`."""
        if self._last_push is not None:
            gap = now - self._last_push
            self.period += self.smoothing * (gap - self.period)
        self._last_push = now
        self._queue.extend(items)
        while len(self._queue) > self.max_frames:
            self._queue.popleft()
            self.dropped += 1

    @property
    def interval(self) -> float:
        """Time between two shown frames at the current period and backlog."""
        return self.period / max(self.frames_per_chunk, len(self._queue))

    def pop(self, now: float) -> Any | None:
        """The next frame if it is due at `now`, else None."""
        if not self._queue or (self._next is not None and now < self._next):
            return None
        interval = self.interval
        # keep the cadence when on time; after a gap (no frames queued for a while) restart it from now
        base = self._next if self._next is not None and now - self._next < interval else now
        self._next = base + interval
        return self._queue.popleft()

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next frame is due (0 if due now), or None when nothing is queued."""
        if not self._queue:
            return None
        return 0.0 if self._next is None else max(self._next - now, 0.0)

    def clear(self) -> None:
        self._queue.clear()
        self._last_push = self._next = None
        self.period = self.initial_period


class RateLimiter:
    """Accepts events at most `fps` times per second on average, on a fixed schedule (no drift, no bursts)."""

    def __init__(self, fps: float):
        self.fps = fps
        self._due: float | None = None

    @property
    def fps(self) -> float:
        return self._fps

    @fps.setter
    def fps(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"fps must be positive, got {value}")
        self._fps = float(value)

    def accept(self, now: float) -> bool:
        period = 1.0 / self._fps
        if self._due is not None and now < self._due - 1e-9:  # (float noise of the schedule)
            return False
        # the next slot is one period after this one; after a pause, restart from now rather than catch up
        self._due = now + period if self._due is None or now - self._due >= period else self._due + period
        return True

    def reset(self) -> None:
        self._due = None


class StreamStats:
    """Driving and output FPS (over the last `fps_window` s), latency percentiles (over the last `window` frames)."""

    def __init__(self, window: int = 300, fps_window: float = 2.0):
        self.fps_window = fps_window
        self._latencies: deque[float] = deque(maxlen=window)
        self._shown: deque[float] = deque()
        self._arrived: deque[float] = deque()
        self.frames = 0

    def arrived(self, now: float) -> None:
        """A driving frame joined the stream at `now`."""
        self._tick(self._arrived, now)

    def shown(self, now: float, latency: float | None) -> None:
        """A frame reached the page at `now`; `latency` (s) since its driving frame arrived (None: a ramp frame)."""
        self.frames += 1
        self._tick(self._shown, now)
        if latency is not None:
            self._latencies.append(latency)

    def fps(self, now: float) -> float:
        """Output frames per second."""
        return self._rate(self._shown, now)

    def input_fps(self, now: float) -> float:
        """Driving frames per second."""
        return self._rate(self._arrived, now)

    def latency(self) -> tuple[float, float] | None:
        """(p50, p95) in seconds, or None before the first driving frame came back."""
        if not self._latencies:
            return None
        values = np.fromiter(self._latencies, dtype=np.float64)
        return float(np.percentile(values, 50)), float(np.percentile(values, 95))

    def reset(self) -> None:
        self._latencies.clear()
        self._shown.clear()
        self._arrived.clear()
        self.frames = 0

    def _tick(self, times: deque[float], now: float) -> None:
        times.append(now)
        while times and times[0] < now - self.fps_window:
            times.popleft()

    def _rate(self, times: deque[float], now: float) -> float:
        recent = [t for t in times if t >= now - self.fps_window]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)
