"""The network stream on loopback: receivers in the test (PyAV listening for udp:// and rtmp://, Debian's ffmpeg for
srt://) get decodable H.264 frames of the right size, count and content; a receiver absent at the start or gone
later is retried in the background while `put` never blocks; bad URLs fail at start-up in one line."""

import shutil
import socket
import subprocess
import threading
import time

import av
import numpy as np
import pytest

from personalive.errors import ConfigError
from personalive.server.network_stream import NetworkStream, check_url

H, W = 48, 64
WAIT = 30.0  # s: generous limits for a shared CPU, never a timed assert


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = WAIT, poll: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(poll)
    return condition()


def level(i: int) -> int:
    """The grey level of test frame i (steps of 8, so H.264 keeps them apart)."""
    return 8 * i % 256


def grey_frame(i: int) -> np.ndarray:
    return np.full((H, W, 3), level(i), np.uint8)


class Receiver:
    """Listens at `url` with PyAV in a thread and decodes what arrives: (width, height, mean grey) per frame."""

    def __init__(self, url: str, fmt: str, options: dict[str, str]):
        self.frames: list[tuple[int, int, float]] = []
        self._stop = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(url, fmt, options), daemon=True)
        self._thread.start()

    def _run(self, url, fmt, options):
        try:
            with av.open(url, "r", format=fmt, options=options) as container:
                for frame in container.decode(video=0):
                    self.frames.append((frame.width, frame.height, float(frame.to_ndarray(format="gray").mean())))
                    if self._stop.is_set():
                        return  # closing the container hangs up on the sender
        except (av.FFmpegError, OSError) as e:  # the sender hung up, or nothing came
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


def rtmp_receiver(port: int) -> Receiver:
    options = {"listen": "1", "timeout": "30", "analyzeduration": "200000"}  # s to wait for the sender; us to probe
    return Receiver(f"rtmp://127.0.0.1:{port}/live/test", "flv", options)


def udp_receiver(port: int) -> Receiver:
    return Receiver(f"udp://127.0.0.1:{port}", "mpegts", {"timeout": "30000000"})  # us


class Feeder:
    """Puts test frames into a stream at about 30 fps from its own thread (the page's role), counting the puts."""

    def __init__(self, stream: NetworkStream):
        self.stream, self.count = stream, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(1 / 30):
            self.stream.put(grey_frame(self.count), time.monotonic())
            self.count += 1

    def stop(self):
        self._stop.set()
        self._thread.join()


def test_rtmp_frames_arrive_decodable_with_the_right_size_count_and_content():
    port = free_port()
    receiver = rtmp_receiver(port)
    time.sleep(0.3)  # listening (a sender that comes too early just retries)
    stream = NetworkStream(f"rtmp://127.0.0.1:{port}/live/test", W, H, fps=30, retry=0.2, keepalive=60)
    try:
        for i in range(40):
            stream.put(grey_frame(i), time.monotonic())
            wait_until(lambda: not stream._queue)  # one at a time: nothing is dropped
        assert wait_until(lambda: stream.sent == 40) and stream.state == "sending"
    finally:
        stream.close()  # flushes and hangs up: the receiver sees the end
    receiver.stop()
    assert len(receiver.frames) == 40 and stream.dropped == 0
    assert {(w, h) for w, h, _ in receiver.frames} == {(W, H)}
    greys = np.array([g for _, _, g in receiver.frames])
    assert np.abs(greys - [level(i) for i in range(40)]).max() < 4  # in order, each the frame sent


def test_rtmp_receiver_absent_then_started_then_gone_then_back():
    port = free_port()
    stream = NetworkStream(f"rtmp://127.0.0.1:{port}/live/test", W, H, fps=30, retry=0.2, max_retry=0.5)
    feeder = Feeder(stream)
    try:
        assert wait_until(lambda: stream.state.startswith("retrying"))  # nobody listens yet
        assert "refused" in stream.state.lower()
        puts = feeder.count
        assert wait_until(lambda: feeder.count > puts + 10)  # put never blocks while nobody listens

        receiver = rtmp_receiver(port)  # the receiver starts later: frames arrive
        assert wait_until(lambda: len(receiver.frames) >= 10)
        assert receiver.frames[0][:2] == (W, H)
        receiver.stop()  # ... and goes away: the sender notices and retries, the feeder goes on

        assert wait_until(lambda: stream.state.startswith("retrying"))
        puts = feeder.count
        assert wait_until(lambda: feeder.count > puts + 10)
        again = rtmp_receiver(port)
        assert wait_until(lambda: len(again.frames) >= 10)
        assert stream.connections >= 2 and "sending" in stream.describe()
        again.stop()
    finally:
        feeder.stop()
        stream.close()


def test_udp_receiver_started_late_gets_frames():
    port = free_port(socket.SOCK_DGRAM)
    stream = NetworkStream(f"udp://127.0.0.1:{port}", W, H, fps=30)
    feeder = Feeder(stream)
    try:
        assert wait_until(lambda: stream.sent >= 30)  # udp has no connection: frames go out with nobody there
        receiver = udp_receiver(port)  # joins mid-stream: decodes from the next keyframe (at most 1 s later)
        assert wait_until(lambda: len(receiver.frames) >= 20)
        receiver.stop()
        assert {(w, h) for w, h, _ in receiver.frames} == {(W, H)}
        greys = [g for _, _, g in receiver.frames]
        assert len(set(np.round(greys))) > 10  # moving frames, not one picture
        assert stream.state == "sending"  # the receiver left: udp does not notice, the sender goes on
    finally:
        feeder.stop()
        stream.close()


def test_a_receiver_that_never_answers_does_not_block_put_and_is_given_up():
    with socket.socket() as silent:  # accepts TCP connections (backlog) but never speaks RTMP
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        stream = NetworkStream(f"rtmp://127.0.0.1:{port}/live/test", W, H, fps=30, max_frames=4, io_timeout=1.0)
        feeder = Feeder(stream)
        try:
            assert wait_until(lambda: "stopped taking frames" in stream.state)  # the sender was restarted
            puts = feeder.count
            assert wait_until(lambda: feeder.count > puts + 10)  # the page side never waited
            assert stream.sent == 0 and stream.dropped > 0
        finally:
            feeder.stop()
            stream.close()


def test_rtsp_to_a_listening_receiver():
    url = f"rtsp://127.0.0.1:{free_port()}/live"
    receiver = Receiver(url, "rtsp", {"rtsp_flags": "listen", "listen_timeout": "30"})  # as an RTSP server would
    time.sleep(0.3)
    stream = NetworkStream(url, W, H, fps=30, retry=0.2)
    feeder = Feeder(stream)
    try:
        assert wait_until(lambda: len(receiver.frames) >= 20)
        assert {(w, h) for w, h, _ in receiver.frames} == {(W, H)} and stream.state == "sending"
    finally:
        feeder.stop()
        stream.close()
        receiver.stop()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="srt:// needs Debian's ffmpeg: apt-get install ffmpeg")
def test_srt_through_ffmpeg(tmp_path):
    port = free_port(socket.SOCK_DGRAM)
    received = tmp_path / "received.ts"
    listener = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i",
                                 f"srt://127.0.0.1:{port}?mode=listener", "-c", "copy", "-f", "mpegts", str(received)])
    stream = NetworkStream(f"srt://127.0.0.1:{port}", W, H, fps=30, retry=0.2)
    feeder = Feeder(stream)
    try:
        assert wait_until(lambda: stream.sent >= 60)  # acknowledged by the relay, which sends as it gets them
        assert stream.state == "sending"
    finally:
        feeder.stop()
        stream.close()
        try:
            listener.wait(10)  # the sender hung up: the listener ends its file
        except subprocess.TimeoutExpired:
            listener.terminate()
            listener.wait()
    with av.open(str(received)) as container:
        frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    assert len(frames) >= 30 and frames[0].shape == (H, W)


def test_bad_urls_and_sizes_fail_at_start_up():
    for url in ["http://example.com/x", "rtmp:///nohost", "file.mp4", "udp:1234"]:
        with pytest.raises(ConfigError, match="--stream-out"):
            check_url(url)
    with pytest.raises(ConfigError, match="even frame size"):
        NetworkStream("udp://127.0.0.1:9", 63, 48, fps=30)
    assert check_url("RTMP://host/live/key") == "rtmp"
