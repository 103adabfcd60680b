"""Where the animation goes besides the page: the output hub.

The page's player hands every paced animated frame to `OutputHub.offer`; the hub passes one stream's frames on to
the virtual camera (`virtual_camera.py`) and the network stream (`network_stream.py`), when they are on, and keeps
the newest frame for the output-only view (`output_view.py`, for an OBS Browser Source), which is always on.

One stream is on the outputs at a time: the first session whose frames reach the hub holds them until it sends none
for `handover` seconds (its tab closed, Stop), then the next streaming session takes over. An output never blocks
the caller: each has its own thread and keeps at most a few frames (newest frames win, drops counted).
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from typing import Protocol

import numpy as np
from PIL import Image

from personalive.server.session import OutputFrame

logger = logging.getLogger(__name__)

VIEW_PATH = "/output"  # the output-only view (output_view.py)


class OutputSink(Protocol):
    """An output beyond the page. `put` must return at once (the caller is the page's event loop)."""

    def put(self, frame: np.ndarray, now: float) -> None:
        """An animated frame (H, W, 3) uint8 RGB, shown at `now` (s, `time.monotonic()`)."""

    def describe(self) -> str:
        """One line of markdown: what this output is and how it is doing."""

    def close(self) -> None:
        """Stop the output's thread and release its device or connection."""


class OutputHub:
    """Carries one stream's animated frames to the outputs and to the output view. Thread-safe.

    Args:
        camera: the virtual camera (`--virtual-camera`), or None; stream: the network stream (`--stream-out`), or
            None; handover: seconds without frames from the session on the outputs after which another takes over.
    """

    def __init__(self, camera: OutputSink | None = None, stream: OutputSink | None = None, handover: float = 2.0):
        self.camera, self.stream = camera, stream
        self.sinks = [sink for sink in (camera, stream) if sink is not None]
        self.handover = handover
        self._lock = threading.Lock()
        self._owner: str | None = None  # the session on the outputs
        self._last: float | None = None  # when it last sent a frame
        self._jpeg: bytes | None = None  # the newest frame, for the output view
        self.frames = 0  # frames carried so far
        self.viewers = 0  # output views open now

    def offer(self, key: str, frame: OutputFrame, now: float) -> bool:
        """A paced frame of session `key` reached the page at `now`; True when it went to the outputs."""
        with self._lock:
            if self._owner != key and self._last is not None and now - self._last < self.handover:
                return False  # another session is on the outputs
            if self._owner != key:
                logger.info("outputs: now carrying session %s", key[:8])
            self._owner, self._last = key, now
            self._jpeg = base64.b64decode(frame.jpeg)
            self.frames += 1
        pixels = frame.pixels if frame.pixels is not None else np.asarray(Image.open(io.BytesIO(self._jpeg)))
        for sink in self.sinks:
            sink.put(pixels, now)
        return True

    def latest(self) -> tuple[int, bytes | None]:
        """(frames carried so far, the newest frame as JPEG bytes or None)."""
        with self._lock:
            return self.frames, self._jpeg

    def carries(self, key: str, now: float) -> bool | None:
        """True when session `key` is on the outputs now, False when another session is, None when none is."""
        with self._lock:
            if self._last is None or now - self._last >= self.handover:
                return None
            return self._owner == key

    def viewer(self, opened: bool) -> None:
        """An output view opened (True) or closed (False)."""
        with self._lock:
            self.viewers += 1 if opened else -1

    def describe(self) -> list[str]:
        """One markdown line per output: the output view, the virtual camera, the network stream."""
        watching = f", {self.viewers} watching" if self.viewers else ""
        return [f"output view [{VIEW_PATH}]({VIEW_PATH}) (the animation alone, for an OBS Browser Source{watching})",
                self.camera.describe() if self.camera else "virtual camera off (`--virtual-camera`)",
                self.stream.describe() if self.stream else "network stream off (`--stream-out URL`)"]

    def summary(self, address: str) -> str:
        """The outputs in one plain line for the start-up log; `address` is the page's (http://host:port)."""
        text = " ; ".join(self.describe()).replace(f"[{VIEW_PATH}]({VIEW_PATH})", address + VIEW_PATH)
        return text.replace("**", "").replace("`", "")

    def status(self, key: str, now: float) -> str:
        """The page's outputs line for session `key` (markdown)."""
        whose = {True: "carry this tab's animation", False: "carry another tab's animation",
                 None: "wait for an animation"}[self.carries(key, now)]
        return f"**Outputs** {whose}: " + " · ".join(self.describe())

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_outputs(width: int, height: int, fps: float, camera: str | None = None,
                 stream_url: str | None = None) -> OutputHub:
    """The outputs asked for on the command line, opened before the models load (so a missing camera fails first).

    Args:
        width, height: frame size; fps: the virtual camera's rate and the stream's nominal rate;
        camera: None (off), "" (the backend's default device) or a device name (`--virtual-camera [NAME]`);
        stream_url: None (off) or the `--stream-out` URL.
    Raises:
        ConfigError, BackendUnavailableError: a bad URL, no virtual camera device, a missing package (one line).
    """
    from personalive.server.network_stream import NetworkStream
    from personalive.server.virtual_camera import VirtualCamera

    if stream_url is not None:
        NetworkStream.check(stream_url, width, height)  # before the camera opens: fail without side effects
    sink_camera = None if camera is None else VirtualCamera(width, height, fps, device=camera or None)
    sink_stream = None if stream_url is None else NetworkStream(stream_url, width, height, fps)
    return OutputHub(sink_camera, sink_stream)
