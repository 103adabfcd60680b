"""The animation as a virtual camera (`--virtual-camera`), for Zoom, Meet, Teams or OBS, through `pyvirtualcam`.

pyvirtualcam is optional (requirements-online.txt) and imported only when a camera is asked for. Its backends: the
OBS Virtual Camera on Windows and macOS, a v4l2loopback device on Linux. The camera runs at a fixed rate in its own
thread and sends the newest animated frame at every tick; when the engine is late it sends the last frame again,
so the camera never stalls (before the first frame it shows black).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from personalive.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-online.txt"
LINUX_SETUP = ("install and load v4l2loopback: sudo apt-get install v4l2loopback-dkms && "
               "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=PersonaLive")
OBS_SETUP = "install OBS Studio 30 or newer, then start and stop its virtual camera once (Start Virtual Camera)"


def open_camera(width: int, height: int, fps: float, device: str | None = None,
                factory: Callable[..., Any] | None = None) -> Any:
    """A `pyvirtualcam.Camera` (or `factory(width=, height=, fps=, device=)`) for RGB frames of height x width.

    Raises:
        BackendUnavailableError: pyvirtualcam is not installed, or no virtual camera device can be opened (the
            message names what to install and, on Linux, the `modprobe v4l2loopback` line).
    """
    if factory is None:
        try:
            import pyvirtualcam  # optional: only when a virtual camera is asked for
        except ImportError as e:
            raise BackendUnavailableError(f"--virtual-camera needs the pyvirtualcam package: {INSTALL}") from e
        factory = pyvirtualcam.Camera
    try:
        return factory(width=width, height=height, fps=fps, device=device)
    except RuntimeError as e:  # pyvirtualcam's error for a missing backend or device
        reason = " ".join(str(e).split())
        setup = LINUX_SETUP if sys.platform.startswith("linux") else OBS_SETUP
        name = f" {device}" if device else ""
        raise BackendUnavailableError(
            f"--virtual-camera{name}: cannot open a virtual camera ({reason}); {setup}") from e


class VirtualCamera:
    """Sends animated frames to a virtual camera at `fps`, repeating the last one while no new one came.

    Args:
        width, height: frame size (the config's); fps: camera frame rate; device: the camera's name or device
            (e.g. /dev/video2; default: the backend's first); factory: stands in for `pyvirtualcam.Camera` (tests).
    Raises:
        BackendUnavailableError: see `open_camera`.
    """

    def __init__(self, width: int, height: int, fps: float, device: str | None = None,
                 factory: Callable[..., Any] | None = None):
        self.camera = open_camera(width, height, fps, device, factory)
        self.width, self.height, self.fps = width, height, fps
        self.name = str(getattr(self.camera, "device", None) or device or "virtual camera")
        self._lock = threading.Lock()
        self._frame = np.zeros((height, width, 3), np.uint8)  # black until the first animated frame
        self._new = False
        self.sent = self.repeated = self.dropped = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="virtual-camera", daemon=True)
        self._thread.start()
        logger.info("virtual camera %s open: %dx%d at %g fps", self.name, width, height, fps)

    def put(self, frame: np.ndarray, now: float) -> None:
        """The newest animated frame (H, W, 3) uint8; one not yet sent is replaced (and counted as dropped)."""
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) frame, got {frame.shape}")
        with self._lock:
            self.dropped += self._new
            self._frame, self._new = frame, True

    def next_frame(self) -> np.ndarray:
        """The frame of the next camera tick: the newest one, or the last one again (counted as a repeat)."""
        with self._lock:
            self.repeated += not self._new
            self._new = False
            self.sent += 1
            return self._frame

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.camera.send(self.next_frame())
                self.camera.sleep_until_next_frame()
        except (RuntimeError, OSError, ValueError) as e:  # the device went away
            self.error = " ".join(str(e).split())
            logger.warning("virtual camera %s stopped: %s", self.name, self.error)

    def describe(self) -> str:
        state = f"**stopped** ({self.error})" if self.error else "on"
        return (f"virtual camera **{self.name}** {state}: {self.width}x{self.height} at {self.fps:g} fps, "
                f"{self.sent} frames sent ({self.repeated} repeats, {self.dropped} dropped)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.camera.close()
