"""The driving-video player: frames sampled at the driving FPS, one closing message, a stop ends it quietly."""

import threading

import numpy as np
from conftest import write_video

from personalive.io.video import VideoReader
from personalive.server.video_feeder import VideoFeeder


class Target:
    key = "tab-1"

    def __init__(self, fps: float):
        self.fps = fps
        self.frames: list[np.ndarray] = []
        self.messages: list[str] = []
        self.done = threading.Event()

    def push_video_frame(self, frame: np.ndarray, now: float) -> None:
        self.frames.append(frame)

    def video_finished(self, feeder: VideoFeeder, message: str) -> None:
        self.messages.append(message)
        self.done.set()


def test_feeder_samples_the_video_at_the_driving_fps(tmp_path):
    frames = [np.full((16, 16, 3), 20 * i, np.uint8) for i in range(10)]
    path = write_video(tmp_path / "drive.mp4", frames, fps=30)
    target = Target(fps=10)  # a third of the video's rate: frames 0, 3, 6, 9
    VideoFeeder(target, VideoReader(path)).start()
    assert target.done.wait(timeout=30)
    assert len(target.frames) == 4 and target.messages == ["Driving video drive.mp4 finished."]
    levels = [int(f.mean()) for f in target.frames]
    assert all(abs(got - 20 * i) <= 4 for got, i in zip(levels, (0, 3, 6, 9), strict=True))


def test_stopped_feeder_sends_no_message(tmp_path):
    path = write_video(tmp_path / "drive.mp4", [np.zeros((16, 16, 3), np.uint8)] * 60, fps=30)
    target = Target(fps=30)
    feeder = VideoFeeder(target, VideoReader(path))
    feeder.stop()  # before it starts: the first wait returns at once
    feeder.start()
    feeder._thread.join(timeout=30)
    assert not feeder._thread.is_alive() and target.messages == [] and target.frames == []
