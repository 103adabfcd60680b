"""One browser session of the web page: its stream state, its bounded queues (`pacing.py`) and its outputs.

Nothing here touches a device: frames cross thread boundaries as CPU uint8 arrays, and `worker.py` owns the engines.
Every method that depends on time takes `now` (seconds of `time.monotonic()`), so the session is testable with a
fake clock.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from personalive.io.images import as_rgb_frame, fit_frame
from personalive.io.video import VideoReader
from personalive.server.pacing import FrameBuffer, Pacer, RateLimiter, Stamp, StreamStats
from personalive.server.video_feeder import VideoFeeder

JPEG_QUALITY = 90  # animated frames travel to the page as inline JPEG
INPUT_CHUNKS = 4  # driving frames kept between two engine steps, in steps (16 frames: 0.5 s at 30 fps, then thinned)


@dataclass
class OutputFrame:
    """An animated frame ready for the page."""

    index: int  # frames shown since the stream (re)started
    jpeg: str  # base64 JPEG
    stamp: Stamp | None  # of its driving frame; None for ramp frames
    pixels: np.ndarray | None = None  # (H, W, 3) uint8, for the outputs beyond the page (outputs.py)


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
