"""The virtual camera through a stand-in for `pyvirtualcam.Camera` (no v4l2loopback device on CI): its size, rate
and device, the frames it is sent, the repeat-last-frame rule, and the one-line errors when no real one can open."""

import importlib.util
import sys
import threading
import time

import numpy as np
import pytest

from personalive.errors import BackendUnavailableError
from personalive.server.virtual_camera import VirtualCamera, open_camera

H, W = 48, 64


class FakeCamera:
    """Stands in for `pyvirtualcam.Camera`: records what it is sent; each tick waits for the test to release it."""

    def __init__(self, width: int, height: int, fps: float, device: str | None = None):
        self.width, self.height, self.fps = width, height, fps
        self.device = device or "/dev/video9"
        self.frames: list[np.ndarray] = []
        self.ticks = threading.Semaphore(0)
        self.closed = False

    def send(self, frame: np.ndarray) -> None:
        assert frame.shape == (self.height, self.width, 3) and frame.dtype == np.uint8
        self.frames.append(frame.copy())

    def sleep_until_next_frame(self) -> None:
        self.ticks.acquire()

    def close(self) -> None:
        self.closed = True


def made_by(cameras: list):
    def factory(**kwargs):
        cameras.append(FakeCamera(**kwargs))
        return cameras[-1]

    return factory


def tick(camera: FakeCamera) -> np.ndarray:
    """Let the camera thread send one more frame and return it."""
    n = len(camera.frames)
    camera.ticks.release()
    end = time.monotonic() + 30
    while len(camera.frames) == n and time.monotonic() < end:
        time.sleep(0.002)
    return camera.frames[n]


def grey(value: int) -> np.ndarray:
    return np.full((H, W, 3), value, np.uint8)


def test_virtual_camera_sends_new_frames_and_repeats_the_last_when_late():
    cameras = []
    output = VirtualCamera(W, H, fps=30, device="/dev/video5", factory=made_by(cameras))
    camera = cameras[0]
    try:
        assert (camera.width, camera.height, camera.fps, camera.device) == (W, H, 30, "/dev/video5")
        while not camera.frames:
            time.sleep(0.002)
        assert camera.frames[0].max() == 0  # black until the first animated frame
        output.put(grey(10), now=0.0)
        assert tick(camera).max() == 10
        assert tick(camera).max() == 10 and tick(camera).max() == 10  # the engine is late: the last frame again
        output.put(grey(20), now=0.1)
        output.put(grey(30), now=0.2)  # two frames within one camera tick: the newer one wins
        assert tick(camera).max() == 30
        assert (output.sent, output.repeated, output.dropped) == (5, 3, 1)
        text = output.describe()
        assert "/dev/video5" in text and f"{W}x{H} at 30 fps" in text and "3 repeats, 1 dropped" in text
        with pytest.raises(ValueError, match="expected a"):
            output.put(np.zeros((H + 1, W, 3), np.uint8), now=0.3)
    finally:
        camera.ticks.release()
        output.close()
    assert camera.closed


def test_missing_pyvirtualcam_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailableError) as e:
        open_camera(W, H, 30)
    assert str(e.value) == ("--virtual-camera needs the pyvirtualcam package: "
                            "pip install -r requirements-online.txt")


@pytest.mark.parametrize("platform, fix", [("linux", "sudo modprobe v4l2loopback"), ("win32", "OBS Studio"),
                                           ("darwin", "OBS Studio")])
def test_no_device_names_what_to_install(monkeypatch, platform, fix):
    def no_device(**kwargs):
        raise RuntimeError("'v4l2loopback' backend: No v4l2 loopback device found at /dev/video[0-99].\n"
                           "Did you run 'modprobe v4l2loopback'?")

    monkeypatch.setattr(sys, "platform", platform)
    with pytest.raises(BackendUnavailableError) as e:
        open_camera(W, H, 30, device="/dev/video3", factory=no_device)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--virtual-camera /dev/video3: cannot open") and fix in message


def test_the_real_pyvirtualcam_fails_in_one_line_without_a_device():
    if importlib.util.find_spec("pyvirtualcam") is None:  # (it is optional; CI does not install it)
        with pytest.raises(BackendUnavailableError, match="pip install -r requirements-online.txt"):
            VirtualCamera(W, H, fps=30)
        return
    with pytest.raises(BackendUnavailableError) as e:
        VirtualCamera(W, H, fps=30, device="/dev/video63")  # (no machine has 64 loopback devices)
    assert "\n" not in str(e.value) and "/dev/video63" in str(e.value)
