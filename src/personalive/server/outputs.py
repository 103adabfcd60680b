"""Where the animation goes besides the page: the output hub.

The page's player hands every paced animated frame to `OutputHub.offer`; the hub passes one stream's frames on to
the outputs (`VirtualCamera`, `NetworkStream`: anything with `put`, `describe` and `close`) and keeps the newest
frame for the output-only view (`output_view.py`, for an OBS Browser Source).

One stream is on the outputs at a time: the first session whose frames reach the hub holds them until it sends none
for `handover` seconds (its tab closed, Stop), then the next streaming session takes over. An output never blocks
the caller: each has its own thread and a bounded queue (newest frames win, drops counted).
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Sequence
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
        sinks: the outputs that get every frame; handover: seconds without frames from the session on the outputs
            after which another session's frames take over.
    """

    def __init__(self, sinks: Sequence[OutputSink] = (), handover: float = 2.0):
        self.sinks = list(sinks)
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

    def carries(self, key: str, now: float) -> bool:
        """Whether session `key` is on the outputs now."""
        with self._lock:
            return self._owner == key and self._last is not None and now - self._last < self.handover

    def viewer(self, opened: bool) -> None:
        """An output view opened (True) or closed (False)."""
        with self._lock:
            self.viewers += 1 if opened else -1

    def describe(self) -> list[str]:
        """One markdown line per output: the output view, then each sink's own line."""
        watching = f", {self.viewers} watching" if self.viewers else ""
        view = f"output view [{VIEW_PATH}]({VIEW_PATH}) (animation only, for an OBS Browser Source{watching})"
        return [view] + [sink.describe() for sink in self.sinks]

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
