"""The animation as a live network stream (`--stream-out URL`), for OBS, a media server or ffplay.

PyAV encodes H.264 (libx264) with low-latency settings: no B-frames, no look-ahead (`tune=zerolatency`), and a
keyframe at least every second (a viewer joining late waits at most a second; while no new frame comes the last
one is sent again as a keyframe each second). Containers: FLV for rtmp://, MPEG-TS for udp:// and srt://, RTSP
(over TCP) for rtsp://. PyAV's own FFmpeg has no SRT, so srt:// goes through Debian's `ffmpeg` program (PyAV
encodes, ffmpeg only relays the MPEG-TS bytes).

`NetworkStream` runs in its own thread with a bounded queue: `put` never blocks, frames that find the queue full
are dropped (counted, and shown on the page). Each connection attempt is a child process (this module run with
`python -m`) that encodes and sends: PyAV opens network outputs holding the GIL, so a receiver that accepts a
connection and then never answers would freeze the whole server if the sending ran in a thread. The child acknowledges
each frame it sent; one that takes no frame for `io_timeout` seconds is killed. When the receiver is not there or
goes away, the sender retries in the background (waiting 1, 2, 4 ... up to 10 s) and the page keeps working.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import av
import numpy as np
from av.video.frame import PictureType

from personalive.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

FORMATS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts", "rtsp": "rtsp", "udp": "mpegts"}  # scheme -> container
TIME_BASE = Fraction(1, 1000)  # frame times in ms, from the wall clock: the stream keeps the page's pacing
X264 = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0", "forced-idr": "1"}
FRAME_HEADER = struct.Struct("<d")  # parent -> child: the frame's time (s), then its H*W*3 RGB bytes
ACK = b"."  # child -> parent: one per frame sent
ACK_POLL = 0.1  # s between looks at the child's acknowledgements while no frame comes
WATCH_POLL = 0.25  # s between the watchdog's looks at a frame going in


def check_url(url: str) -> str:
    """The scheme of a --stream-out URL, checked; srt:// also needs the ffmpeg program.

    Raises:
        ConfigError: not an rtmp://, srt://, rtsp:// or udp:// URL; BackendUnavailableError: srt:// without ffmpeg.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in FORMATS or not parts.hostname:
        raise ConfigError(f"--stream-out {url}: expected a URL like udp://127.0.0.1:1234, rtmp://HOST/live/KEY, "
                          f"srt://HOST:PORT or rtsp://HOST:8554/live")
    if scheme == "srt" and shutil.which("ffmpeg") is None:
        raise BackendUnavailableError(f"--stream-out {url}: srt:// needs the ffmpeg program (PyAV's FFmpeg has no "
                                      f"SRT): apt-get install ffmpeg, or stream to udp:// or rtmp://")
    if "libx264" not in av.codecs_available:
        raise BackendUnavailableError("--stream-out needs PyAV with libx264 (the PyPI wheels have it): "
                                      "pip install -r requirements.txt")
    return scheme


def _end(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Close a child's stdin (its end of input) and wait for it to exit; kill it after `timeout` s."""
    try:
        proc.stdin.close()
    except OSError:
        pass  # it is gone already
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_line(log: IO[bytes]) -> str | None:
    """The last line a child wrote to its log file (its stderr), if any."""
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else None


class _Connection:
    """One attempt at the receiver (in the child process): a container with an H.264 stream, frame times counted
    from its own start."""

    def __init__(self, url: str, scheme: str, width: int, height: int, fps: float):
        self._relay: subprocess.Popen | None = None
        if scheme == "srt":  # ffmpeg relays MPEG-TS from its stdin to the SRT receiver
            self._log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty ffmpeg can never block on it
            self._relay = subprocess.Popen(
                ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-probesize", "32", "-analyzeduration",
                 "0", "-f", "mpegts", "-i", "pipe:0", "-c", "copy", "-f", "mpegts", url],
                stdin=subprocess.PIPE, stderr=self._log)
            self.container = av.open(self._relay.stdin, "w", format="mpegts", options={"flush_packets": "1"})
        else:
            options = {"rtsp_transport": "tcp"} if scheme == "rtsp" else {}
            self.container = av.open(url, "w", format=FORMATS[scheme], options=options)
        self.stream = self.container.add_stream("libx264", rate=round(fps), options=X264)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = TIME_BASE
        self.start: float | None = None
        self.pts = self.keyframe_pts = -1

    def send(self, frame: np.ndarray, now: float) -> None:
        """Encode and send one frame (H, W, 3) uint8 shown at `now`; a keyframe when the last is a second old."""
        if self._relay is not None and self._relay.poll() is not None:
            raise ConnectionError(f"ffmpeg exited ({self._relay_error()})")
        if self.start is None:
            self.start = now
        self.pts = max(round((now - self.start) * 1000), self.pts + 1)  # ms, strictly increasing
        video = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video.pts, video.time_base = self.pts, TIME_BASE
        if self.keyframe_pts < 0 or self.pts - self.keyframe_pts >= 1000:
            video.pict_type = PictureType.I
            self.keyframe_pts = self.pts
        for packet in self.stream.encode(video):
            self.container.mux(packet)

    def _flush(self) -> None:
        for packet in self.stream.encode():  # zerolatency holds no frames back, but a flush costs nothing
            self.container.mux(packet)

    def _relay_error(self) -> str:
        return _last_line(self._log) or f"code {self._relay.returncode}"

    def close(self) -> None:
        for finish in (self._flush, self.container.close):
            try:
                finish()
            except (av.FFmpegError, OSError, ValueError):
                pass  # the receiver is gone: nothing left to send to
        if self._relay is not None:
            _end(self._relay)
            self._log.close()


def _child(url: str, width: int, height: int, fps: float) -> int:
    """The child process: frames from stdin (`FRAME_HEADER` + RGB bytes) to the receiver, an `ACK` on stdout for
    each; exit 0 at the end of stdin, 1 with a one-line reason on stderr when the receiver is absent or gone."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    size = width * height * 3
    connection = None
    try:
        connection = _Connection(url, urlsplit(url).scheme.lower(), width, height, fps)
        while len(header := stdin.read(FRAME_HEADER.size)) == FRAME_HEADER.size:
            data = stdin.read(size)
            if len(data) < size:
                break
            connection.send(np.frombuffer(data, np.uint8).reshape(height, width, 3), FRAME_HEADER.unpack(header)[0])
            stdout.write(ACK)
            stdout.flush()
        return 0
    except (av.FFmpegError, OSError) as e:
        print(" ".join(str(e).split()) or type(e).__name__, file=sys.stderr, flush=True)
        return 1
    finally:
        if connection is not None:
            connection.close()


class _Sender:
    """The parent's handle on one child process (one connection attempt)."""

    def __init__(self, url: str, width: int, height: int, fps: float, timeout: float):
        self._log = tempfile.TemporaryFile()  # the child's stderr: a file, so the child never blocks on it
        src = str(Path(__file__).resolve().parents[2])  # the child imports this package from where we did
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, url, str(width), str(height), str(fps)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.acked = self.counted = 0  # frames the child sent; of those, the ones the parent has counted
        self.kinds: deque[bool] = deque()  # per frame handed over and not yet counted: real (True) or a keep-alive
        self.timeout = timeout
        self.killed = False  # by the watchdog: the receiver stopped taking frames
        self._writing_since: float | None = None  # when the frame being handed over started to go in
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read_acks, name="stream-out-acks", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="stream-out-watchdog", daemon=True)
        self._reader.start()
        self._watchdog.start()

    def _read_acks(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.acked += chunk.count(ACK)

    def _watch(self) -> None:
        """Kill the child when a frame has taken more than `timeout` s to go in: it stopped taking frames."""
        while not self._done.wait(WATCH_POLL) and self.proc.poll() is None:
            since = self._writing_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.killed = True
                self.proc.kill()

    def send(self, frame: np.ndarray, now: float) -> None:
        """Hand a frame to the child; ConnectionError when the child is gone or takes nothing for `timeout` s."""
        if self.proc.poll() is not None:
            raise ConnectionError(self.reason())
        self._writing_since = time.monotonic()
        try:
            self.proc.stdin.write(FRAME_HEADER.pack(now))
            self.proc.stdin.write(np.ascontiguousarray(frame).data)
            self.proc.stdin.flush()
        except OSError as e:  # a broken pipe: the child exited (or the watchdog ended it)
            raise ConnectionError(self.reason()) from e
        finally:
            self._writing_since = None

    def reason(self) -> str:
        """Why the child stopped, in one line."""
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            return "the sender process does not answer"
        if self.killed:
            return "the receiver stopped taking frames"
        return _last_line(self._log) or f"the sender process exited with code {self.proc.returncode}"

    def close(self) -> None:
        """End of frames: the child flushes and hangs up (killed if it does not within 2 s)."""
        self._done.set()
        _end(self.proc)
        self._watchdog.join(2.0)
        self._reader.join(2.0)
        self.proc.stdout.close()
        self._log.close()


class NetworkStream:
    """Pushes animated frames as H.264 to `url`, from its own thread through a child process per connection.

    Args:
        url: rtmp://, srt://, rtsp:// or udp:// (see `check_url`); width, height: frame size (even numbers);
        fps: nominal frame rate written in the stream header; max_frames: frames queued at most;
        retry: first wait before reconnecting (s), doubled after each failure up to `max_retry`;
        keepalive: with no new frame for this long, the last one is sent again (as a keyframe);
        io_timeout: a sender that takes no frame for this long (the receiver stopped answering) is restarted.
    Raises:
        ConfigError, BackendUnavailableError: see `check_url`; odd frame sizes (H.264 4:2:0 needs even ones).
    """

    def __init__(self, url: str, width: int, height: int, fps: float, max_frames: int = 8, retry: float = 1.0,
                 max_retry: float = 10.0, keepalive: float = 1.0, io_timeout: float = 5.0):
        self.scheme = self.check(url, width, height)
        self.url, self.width, self.height, self.fps = url, width, height, fps
        self.retry, self.max_retry, self.keepalive, self.io_timeout = retry, max_retry, keepalive, io_timeout
        self.max_frames = max_frames
        self._queue: deque[tuple[np.ndarray, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.sent = self.dropped = self.connections = 0  # frames the receiver got (keep-alives not counted)
        self.state = "connecting"
        self._thread = threading.Thread(target=self._run, name="stream-out", daemon=True)
        self._thread.start()
        logger.info("stream out to %s: H.264 %dx%d, keyframe every second", url, width, height)

    @staticmethod
    def check(url: str, width: int, height: int) -> str:
        """Fail at start-up, before anything opens: a bad URL (see `check_url`) or an odd frame size; the scheme."""
        scheme = check_url(url)
        if width % 2 or height % 2:
            raise ConfigError(f"--stream-out needs an even frame size for H.264, got {width}x{height}; set even "
                              f"height= and width=")
        return scheme

    def put(self, frame: np.ndarray, now: float) -> None:
        """Queue a frame (H, W, 3) uint8 shown at `now`; a full queue drops its oldest frame (counted)."""
        with self._cond:
            self._queue.append((frame, now))
            if len(self._queue) > self.max_frames:
                self._queue.popleft()
                self.dropped += 1
            self._cond.notify_all()

    def _next(self, timeout: float) -> tuple[np.ndarray, float] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed, timeout)
            return self._queue.popleft() if self._queue and not self._closed else None

    def _run(self) -> None:
        delay = self.retry
        while not self._closed:
            sender = _Sender(self.url, self.width, self.height, self.fps, self.io_timeout)
            try:
                self._serve(sender)
            except ConnectionError as e:  # no receiver, or it went away
                if sender.acked:
                    delay = self.retry  # it was connected: start over with the short wait
                self.state = f"retrying in {delay:g} s ({e})"
                logger.info("stream out to %s: %s", self.url, self.state)
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, delay)
                    self.dropped += len(self._queue)  # stale by now: the next connection starts afresh
                    self._queue.clear()
                delay = min(2 * delay, self.max_retry)
            finally:
                sender.close()
                self._count_acks(sender)

    def _serve(self, sender: _Sender) -> None:
        """Feed one child until the stream closes; ConnectionError when the child cannot go on."""
        last: np.ndarray | None = None
        last_time = time.monotonic()
        while not self._closed:
            item = self._next(ACK_POLL)
            if item is None and last is not None and time.monotonic() - last_time >= self.keepalive:
                item = (last, time.monotonic())  # a keep-alive: the last frame again
                sender.kinds.append(False)
            elif item is not None:
                sender.kinds.append(True)
            if item is not None:
                sender.send(*item)
                last, last_time = item[0], time.monotonic()
            elif sender.proc.poll() is not None:
                raise ConnectionError(sender.reason())
            self._count_acks(sender)

    def _count_acks(self, sender: _Sender) -> None:
        """Count the frames the child has sent since the last call (keep-alives aside)."""
        while sender.counted < sender.acked and sender.kinds:
            sender.counted += 1
            self.sent += sender.kinds.popleft()
            if self.state != "sending" and not self._closed:
                self.state = "sending"
                self.connections += 1
                logger.info("stream out: sending to %s", self.url)

    def describe(self) -> str:
        return (f"stream **{self.url}** (H.264 {self.width}x{self.height}): {self.state}, {self.sent} frames sent, "
                f"{self.dropped} dropped")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(10.0)


if __name__ == "__main__":  # the child process of a NetworkStream: URL WIDTH HEIGHT FPS
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
