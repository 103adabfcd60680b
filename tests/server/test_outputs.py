"""The output hub (one stream on the outputs at a time, handed over when it pauses), the output view's MJPEG stream
with several viewers, and the command line's outputs: refused in one line before any model loads, and listed at
start-up."""

import asyncio
import logging
import socket
import sys
import threading
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from personalive.server.app import launch
from personalive.server.output_view import BOUNDARY, mjpeg_parts
from personalive.server.outputs import OutputHub, open_outputs
from personalive.server.session import OutputFrame, encode_jpeg
from personalive.server.worker import StreamServer, Worker


class RecordingSink:
    def __init__(self):
        self.frames, self.closed = [], False

    def put(self, frame, now):
        self.frames.append((frame, now))

    def describe(self):
        return f"recording sink: {len(self.frames)} frames"

    def close(self):
        self.closed = True


def animated(index: int, value: int, pixels: bool = True) -> OutputFrame:
    frame = np.full((16, 16, 3), value, np.uint8)
    return OutputFrame(index, encode_jpeg(frame), None, frame if pixels else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_carries_one_session_and_hands_over_when_it_pauses():
    camera, stream = RecordingSink(), RecordingSink()
    hub = OutputHub(camera, stream, handover=2.0)
    assert hub.carries("a", 0.0) is None and hub.latest() == (0, None)
    assert hub.offer("a", animated(1, 10), now=0.0)
    assert not hub.offer("b", animated(1, 200), now=0.5)  # a is on the outputs
    assert hub.offer("a", animated(2, 20), now=1.0)
    assert hub.carries("a", 1.5) is True and hub.carries("b", 1.5) is False
    assert [f[0, 0, 0] for f, _ in camera.frames] == [10, 20] and len(stream.frames) == 2
    assert hub.offer("b", animated(1, 200, pixels=False), now=3.5)  # a paused for 2.5 s: b takes over
    assert abs(int(camera.frames[-1][0][0, 0, 0]) - 200) < 3  # decoded from the JPEG when no pixels came along
    count, jpeg = hub.latest()
    assert count == 3 and jpeg[:2] == b"\xff\xd8"  # a JPEG for the output view
    status = hub.status("a", 4.0)
    assert status.startswith("**Outputs** carry another tab's animation") and "recording sink: 3 frames" in status
    hub.close()
    assert camera.closed and stream.closed


def test_hub_lists_outputs_that_are_off():
    hub = OutputHub()
    lines = hub.describe()
    assert "output view [/output](/output)" in lines[0]
    assert lines[1].startswith("virtual camera off") and lines[2].startswith("network stream off")
    assert "virtual camera off (--virtual-camera)" in hub.summary("http://localhost:7860")
    assert "http://localhost:7860/output" in hub.summary("http://localhost:7860")


def test_mjpeg_parts_send_each_new_frame_once_and_count_viewers():
    hub = OutputHub()

    async def watch() -> list[bytes]:
        parts, viewer = [], mjpeg_parts(hub, poll=0.001)
        parts.append(await anext(viewer))  # the opening boundary
        hub.offer("a", animated(1, 50), now=0.0)
        parts.append(await anext(viewer))
        assert hub.viewers == 1
        hub.offer("a", animated(2, 90), now=0.1)
        parts.append(await anext(viewer))
        await viewer.aclose()  # the viewer left
        return parts

    parts = asyncio.run(watch())
    assert parts[0] == f"--{BOUNDARY}\r\n".encode()
    assert all(p.startswith(b"Content-Type: image/jpeg") and p.endswith(f"--{BOUNDARY}\r\n".encode())
               for p in parts[1:])
    assert parts[1] != parts[2] and hub.viewers == 0


def read_mjpeg_frames(url: str, count: int, frames: list[bytes]) -> None:
    """Read `count` JPEG frames from an MJPEG URL into `frames`."""
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            while (start := buffer.find(b"\xff\xd8")) >= 0 and (end := buffer.find(b"\xff\xd9", start)) >= 0:
                frames.append(buffer[start : end + 2])
                buffer = buffer[end + 2 :]
            if len(frames) >= count:
                return


def test_output_view_is_served_and_several_viewers_watch_one_stream():
    worker = Worker(SimpleNamespace(), "fake:0")  # no stream starts: frames come straight into the hub
    server = StreamServer([worker], 16, 16, window=4, fps=10, seed=0)
    hub = OutputHub()
    port = free_port()
    page = launch(server, (16, 16), port=port, block=False, quiet=True, outputs=hub)
    try:
        url = f"http://127.0.0.1:{port}/output"
        html = httpx.get(url, timeout=30).text
        assert '<img id="pl-view"' in html and 'src="/output.mjpg"' in html and "<button" not in html
        seen: list[list[bytes]] = [[], []]
        viewers = [threading.Thread(target=read_mjpeg_frames, args=(url + ".mjpg", 3, s)) for s in seen]
        for viewer in viewers:
            viewer.start()
        i = 0
        while any(v.is_alive() for v in viewers) and i < 3000:
            hub.offer("a", animated(i, 40 * (i % 5)), now=i / 30)
            i += 1
            threading.Event().wait(1 / 30)
        for viewer in viewers:
            viewer.join(30)
        assert all(len(s) >= 3 for s in seen) and len({f for s in seen for f in s}) > 1
    finally:
        page.close()
        server.shutdown()


def cli():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("inference_online", ROOT / "inference_online.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ["--config", str(ROOT / "configs/prompts/tiny.yaml")]


def test_cli_refuses_bad_outputs_in_one_line_before_loading_models(tiny_weights, caplog, monkeypatch):
    module, common = cli()
    common += [f"weights_dir={tiny_weights}", "--port", str(free_port())]
    caplog.set_level(logging.INFO)
    assert module.main(common + ["--stream-out", "http://example.com/live"]) == 2
    assert "--stream-out http://example.com/live: expected a URL like udp://" in caplog.text
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # as if not installed
    assert module.main(["--virtual-camera", *common]) == 2
    assert "--virtual-camera needs the pyvirtualcam package: pip install -r requirements-online.txt" in caplog.text
    assert module.main([*common, "--virtual-camera", "no_such_key=1"]) == 2  # an override, not a camera NAME
    assert "no_such_key" in caplog.text.splitlines()[-1]
    assert "engine ready" not in caplog.text  # no model was loaded


def test_open_outputs_opens_what_is_asked_for(monkeypatch):
    hub = open_outputs(16, 16, 30)
    assert hub.camera is None and hub.stream is None
    with pytest.raises(Exception, match="odd|even frame size"):
        open_outputs(15, 16, 30, stream_url="udp://127.0.0.1:9")
    hub = open_outputs(16, 16, 30, stream_url=f"udp://127.0.0.1:{free_port()}")
    try:
        assert hub.stream is not None and "network stream off" not in " ".join(hub.describe())
    finally:
        hub.close()
