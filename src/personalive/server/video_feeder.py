"""The driving-video player of a web session: a thread that feeds a video file's frames in real time."""

from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np

from personalive.errors import PersonaLiveError
from personalive.io.video import VideoReader


class FeedTarget(Protocol):
    """What the feeder drives: a `session.Session`, named by its methods so that this module need not import the
    session module, which starts feeders."""

    key: str

    @property
    def fps(self) -> float: ...

    def push_video_frame(self, frame: np.ndarray, now: float) -> None: ...

    def video_finished(self, feeder: VideoFeeder, message: str) -> None: ...


class VideoFeeder:
    """Plays a driving video into a session in real time, sampled at the session's driving FPS (own thread)."""

    def __init__(self, session: FeedTarget, reader: VideoReader):
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
