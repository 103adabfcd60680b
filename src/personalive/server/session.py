"""One browser session of the web page: its stream state, a bounded input buffer, output pacing and latency stats.

The queue discipline decides the latency users feel, so every queue here is bounded:

- `FrameBuffer` holds the driving frames that arrived since the engine's last step (a few chunks at most); each
  step takes a chunk evenly spaced in time over that interval, ending with the newest frame (`selection.py`), and
  the rest are dropped (and counted), so a frame never waits behind a backlog and motion advances evenly.
- `Pacer` releases the engine's output chunks one frame at a time, spread over the measured time between chunks
  instead of 4 at once; it too holds at most two chunks.
- `StreamStats` turns driving and shown frames into the page's readout: FPS in and out and latency percentiles,
  where latency runs from a driving frame's arrival at the server to its animated frame leaving for the page (the
  page itself measures capture to screen, from the browser `Stamp` each webcam frame carries through the engine).

Nothing here touches a device: frames cross thread boundaries as CPU uint8 arrays, and `worker.py` owns the engines.
Every method that depends on time takes `now` (seconds of `time.monotonic()`), so the policies are testable with a
fake clock.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from personalive.errors import NoFaceError, PersonaLiveError
from personalive.io.faces import FaceCropper, mediapipe_available
from personalive.io.images import fit_frame
from personalive.io.video import VideoReader
from personalive.server.selection import pick_evenly, thin

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90  # animated frames travel to the page as inline JPEG
INPUT_CHUNKS = 4  # driving frames kept between two engine steps, in steps (16 frames: 0.5 s at 30 fps, then thinned)


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


@dataclass
class OutputFrame:
    """An animated frame ready for the page."""

    index: int  # frames shown since the stream (re)started
    jpeg: str  # base64 JPEG
    stamp: Stamp | None  # of its driving frame; None for ramp frames
    pixels: np.ndarray | None = None  # (H, W, 3) uint8, for the outputs beyond the page (outputs.py)


def as_rgb_frame(frame: Any) -> np.ndarray:
    """A webcam or video frame -> uint8 (H, W, 3); grey and RGBA frames are converted.

    Raises:
        ValueError: not an image array (the message says what it is).
    """
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"expected an image array, got {type(frame).__name__}")
    if frame.ndim == 2:
        frame = frame[:, :, None].repeat(3, axis=2)
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4) or min(frame.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        if not np.issubdtype(frame.dtype, np.number):
            raise ValueError(f"expected a numeric image, got dtype {frame.dtype}")
        scale = 255.0 if np.issubdtype(frame.dtype, np.floating) and frame.max(initial=0) <= 1.0 else 1.0
        frame = np.clip(frame * scale, 0, 255).astype(np.uint8)
    if frame.shape[2] == 1:
        frame = frame.repeat(3, axis=2)
    return np.ascontiguousarray(frame[:, :, :3])


def crop_around(frame: np.ndarray, height: int, width: int, center: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3): the largest window of the target aspect ratio, as centred on `center`
    (x, y in pixels; default: the middle) as the frame allows, resized with `fit_frame`."""
    h, w = frame.shape[:2]
    if center is None:
        return fit_frame(frame, height, width)
    crop_w, crop_h = (w, max(1, round(w * height / width))) if w * height <= h * width else (
        max(1, round(h * width / height)), h)
    left = int(min(max(center[0] - crop_w / 2, 0), w - crop_w))
    top = int(min(max(center[1] - crop_h / 2, 0), h - crop_h))
    return fit_frame(np.ascontiguousarray(frame[top : top + crop_h, left : left + crop_w]), height, width)


class FaceFinder:
    """Face boxes for reference checks, shared by the request threads (one MediaPipe FaceMesh behind a lock).

    Without mediapipe, `available` is False and references are taken without a face check.
    """

    def __init__(self):
        self.available = mediapipe_available()
        self._cropper: FaceCropper | None = None
        self._lock = threading.Lock()
        if not self.available:
            logger.warning("mediapipe is not installed: reference portraits are not checked for a face")

    def box(self, frame: np.ndarray) -> tuple[int, int, int, int] | None:
        """Face box (x1, y1, x2, y2) of a uint8 RGB frame (H, W, 3), or None if there is no face."""
        with self._lock:
            if self._cropper is None:
                self._cropper = FaceCropper()
            return self._cropper.box(frame)

    def close(self) -> None:
        with self._lock:
            if self._cropper is not None:
                self._cropper.close()
                self._cropper = None


def prepare_reference(image: Image.Image, height: int, width: int, faces: FaceFinder | None = None) -> Image.Image:
    """A reference portrait as the engine will take it: cropped to the target aspect ratio around the face (or the
    middle, without a face finder) and resized to height x width.

    Raises:
        NoFaceError: `faces` finds no face in the image.
    """
    frame = np.asarray(image.convert("RGB"))
    center = None
    if faces is not None and faces.available:
        box = faces.box(frame)
        if box is None:
            raise NoFaceError("no face found in the reference image; use a frontal, well-lit portrait")
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return Image.fromarray(crop_around(frame, height, width, center))


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> str:
    """uint8 (H, W, 3) -> base64 JPEG text."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Session:
    """The stream state of one browser session. Thread-safe: the page's handlers, the session's video feeder and an
    engine worker all call into it.

    The stream runs while a reference is set, a source is active (webcam frames arriving, or a video playing) and
    the user has not pressed Stop. Each (re)start bumps `epoch`; a worker re-fuses the reference when it sees a new
    epoch, and output of an older epoch is discarded.

    Args:
        key: the browser session id; height, width: driving frame size (the config's);
        window: frames per engine step; fps: driving frames per second; seed: noise seed of the next (re)start;
        idle_timeout: seconds without webcam frames after which the webcam stream counts as stopped.
    """

    def __init__(self, key: str, height: int, width: int, window: int, fps: float, seed: int,
                 idle_timeout: float = 2.0):
        self.key, self.height, self.width, self.window = key, height, width, window
        self.idle_timeout = idle_timeout
        self.inputs = FrameBuffer(INPUT_CHUNKS * window)
        self.limiter = RateLimiter(fps)
        self.pacer = Pacer(window, window / fps)
        self.stats = StreamStats()
        self.seed = seed
        self._lock = threading.RLock()
        self.reference: Image.Image | None = None
        self.epoch = 0
        self.source: str | None = None  # "webcam" | "video" | None
        self.stopped = False  # the user pressed Stop: webcam frames are ignored until Start
        self.closed = False
        self.notice = ""  # last message for the page (errors, hints)
        self.error: str | None = None  # the stream failed; cleared by the next (re)start
        self.rejected = 0  # driving frames that were not images
        self.received = 0  # webcam frames that reached the session
        self.limited = 0  # webcam frames left out by the driving FPS (the webcam sends more)
        self.step_time: float | None = None  # moving average of the engine step (s)
        self.worker: Any = None  # the worker serving this session (set by the server)
        self.waiting: tuple[int, int] | None = None  # (position, waiting) while queued for a slot
        self.last_seen = time.monotonic()  # last time the page's player asked for frames
        self._last_input: float | None = None
        self._feeder: VideoFeeder | None = None
        self._shown = 0

    # ---------------------------------------------------------------------------------------------------- settings
    @property
    def fps(self) -> float:
        return self.limiter.fps

    def set_fps(self, fps: float) -> None:
        with self._lock:
            self.limiter.fps = fps

    def set_seed(self, seed: int) -> None:
        with self._lock:
            self.seed = int(seed)

    def set_reference(self, image: Image.Image) -> None:
        """Take a new reference portrait; a running stream restarts on it."""
        with self._lock:
            self.reference = image
            self.restart()

    def restart(self) -> None:
        """Start the stream over: a new epoch (re-fuse, fresh noise from `seed`), empty queues, fresh stats."""
        with self._lock:
            self.epoch += 1
            self.error = None
            self.inputs.clear()
            self.pacer.clear()
            self.stats.reset()
            self.limiter.reset()
            self._shown = 0

    # ------------------------------------------------------------------------------------------------------ inputs
    def push_webcam(self, frame: Any, now: float, captured: float | None = None) -> None:
        """A webcam frame arrived (captured by the page at `captured`, ms of the browser's clock); it joins the stream
        unless a video plays, Stop was pressed or nothing is fused."""
        with self._lock:
            self.received += 1
            if self.closed or self.stopped or self.source == "video":
                return
            if self.reference is None:
                self.notice = "Fuse a reference portrait first: webcam frames are ignored until then."
                return
            if self.source is None:
                self.source = "webcam"
                self.restart()
            self._last_input = now
            if not self.limiter.accept(now):
                self.limited += 1
                return
        self._push(frame, Stamp(now, captured))

    def push_video_frame(self, frame: np.ndarray, now: float) -> None:
        """A frame of the playing driving video (already paced by the feeder)."""
        with self._lock:
            if self.closed or self.source != "video":
                return
            self._last_input = now
        self._push(frame, Stamp(now))

    def _push(self, frame: Any, stamp: Stamp) -> None:
        try:
            frame = fit_frame(as_rgb_frame(frame), self.height, self.width)
        except ValueError as e:
            with self._lock:
                self.rejected += 1
                self.notice = f"A driving frame was skipped: {e}."
            return
        with self._lock:
            self.stats.arrived(stamp.arrived)
        self.inputs.push(frame, stamp, stamp.arrived)

    def play_video(self, path: str | Path) -> None:
        """Drive the stream with a video file instead of the webcam (played in real time at the driving FPS).

        Raises:
            VideoReadError: the file is not a readable video.
        """
        reader = VideoReader(path)  # fails here, on the request, for a bad file
        with self._lock:
            self._stop_feeder()
            self.stopped = False
            self.source = "video"
            self.restart()
            self._feeder = VideoFeeder(self, reader)
            self._feeder.start()

    def video_finished(self, feeder: VideoFeeder, message: str) -> None:
        with self._lock:
            if self._feeder is feeder:
                self._feeder = None
                self.source = None
                self.notice = message

    def stop(self) -> None:
        """Stop animating (the webcam preview keeps running); Start resumes."""
        with self._lock:
            self.stopped = True
            self._stop_feeder()
            self.source = None
            self.restart()

    def start(self) -> None:
        with self._lock:
            self.stopped = False

    def _stop_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.stop()
            self._feeder = None

    def close(self) -> None:
        """The browser session ended."""
        with self._lock:
            self.closed = True
            self._stop_feeder()
            self.source = None
            self.inputs.clear()

    def wants_stream(self, now: float) -> bool:
        """Whether this session needs an engine now (and, as a side effect, ends an idle webcam stream)."""
        with self._lock:
            if self.source == "webcam" and (self._last_input is None or now - self._last_input > self.idle_timeout):
                self.source = None
                self.restart()
            return (not self.closed and self.error is None and self.reference is not None
                    and self.source is not None)

    # ----------------------------------------------------------------------------------------------------- outputs
    def stream_spec(self) -> tuple[int, Image.Image | None, int]:
        """(epoch, reference, seed) for a worker to (re)start on."""
        with self._lock:
            return self.epoch, self.reference, self.seed

    def deliver(self, frames: np.ndarray, stamps: list[Stamp | None], epoch: int, step_time: float,
                now: float) -> None:
        """Animated frames (n, H, W, 3) uint8 of `epoch`, with their driving frames' stamps (None: ramp)."""
        encoded = [encode_jpeg(frame) for frame in frames]
        with self._lock:
            if epoch != self.epoch or self.closed:
                return  # a restart happened while this step ran
            self.step_time = step_time if self.step_time is None else 0.8 * self.step_time + 0.2 * step_time
            items = []
            for frame, jpeg, stamp in zip(frames, encoded, stamps, strict=True):
                self._shown += 1
                items.append(OutputFrame(self._shown, jpeg, stamp, frame))
            self.pacer.push(items, now)

    def fail(self, epoch: int, message: str) -> None:
        """The stream of `epoch` cannot go on (e.g. a reference the engine rejects); the page shows `message`."""
        with self._lock:
            if epoch == self.epoch:
                self.error = message
                self.notice = message

    def next_output(self, now: float) -> OutputFrame | None:
        """The next paced frame for the page, if one is due; records it in the stats."""
        with self._lock:
            item = self.pacer.pop(now)
            if item is not None:
                self.stats.shown(now, None if item.stamp is None else now - item.stamp.arrived)
            return item

    def wait_time(self, now: float) -> float | None:
        with self._lock:
            return self.pacer.wait_time(now)

    # ------------------------------------------------------------------------------------------------------ readout
    def stats_text(self, now: float) -> str:
        """One line for the page: driving and output FPS, in-server latency p50/p95, dropped frames, engine step."""
        with self._lock:
            latency = self.stats.latency()
            parts = [f"driving **{self.stats.input_fps(now):.1f}** fps", f"output **{self.stats.fps(now):.1f}** fps"]
            parts.append("latency in server p50 **{:.0f}** ms, p95 **{:.0f}** ms".format(*(1000 * x for x in latency))
                         if latency else "latency in server p50 – ms, p95 – ms")
            parts.append(f"dropped **{self.inputs.dropped}** driving frames")
            if self.pacer.dropped:
                parts.append(f"**{self.pacer.dropped}** output frames")
            if self.rejected:
                parts.append(f"skipped **{self.rejected}** bad frames")
            if self.step_time is not None:
                parts.append(f"engine step **{1000 * self.step_time:.0f}** ms")
            parts.append(f"queued **{len(self.inputs)}**/{self.inputs.capacity}")
            return " · ".join(parts)


class VideoFeeder:
    """Plays a driving video into a session in real time, sampled at the session's driving FPS (own thread)."""

    def __init__(self, session: Session, reader: VideoReader):
        self.session, self.reader = session, reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"video-{session.key[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        name = self.reader.path.name
        message = f"Driving video {name} finished."
        try:
            start, next_time, shown = time.monotonic(), 0.0, 0
            for index, frame in enumerate(self.reader):
                position = index / self.reader.fps  # seconds into the video
                if position + 1e-6 < next_time:
                    continue  # the driving FPS is lower than the video's: skip this frame
                if self._stop.wait(max(start + position - time.monotonic(), 0.0)):
                    return
                self.session.push_video_frame(frame, time.monotonic())
                shown += 1
                next_time = max(next_time + 1.0 / self.session.fps, position)
            if shown == 0:
                message = f"Driving video {name} has no frames."
        except PersonaLiveError as e:
            message = f"Driving video stopped: {e}"
        finally:
            self.reader.close()
            if not self._stop.is_set():
                self.session.video_finished(self, message)
