"""The page's server without a browser: the address is checked before models load, the page is served on
127.0.0.1, uploads are capped, and the command line turns a taken port into one line."""

import logging
import socket
from types import SimpleNamespace

import httpx
import pytest

from personalive.errors import ConfigError
from personalive.server.app import _frame_html, build_page, check_address, launch, signatures
from personalive.server.pacing import Stamp
from personalive.server.session import OutputFrame
from personalive.server.worker import StreamServer, Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_address_refuses_bad_and_taken_ports():
    with pytest.raises(ConfigError, match="not a TCP port"):
        check_address("127.0.0.1", 99999)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}.*--port"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", free_port())


def test_animated_frames_carry_their_webcam_capture_time_to_the_page():
    webcam = _frame_html(OutputFrame(7, "AAAA", Stamp(arrived=3.0, captured=1712345678901.5)))
    assert 'data-frame="7"' in webcam and 'data-captured="1712345678901.5"' in webcam  # for screen_latency.js
    for stamp in (None, Stamp(arrived=3.0)):  # a ramp frame, a driving-video frame
        assert "data-captured" not in _frame_html(OutputFrame(7, "AAAA", stamp))


def test_the_guard_knows_each_handler_and_the_kind_of_its_inputs():
    server = StreamServer([Worker(SimpleNamespace(), "fake:0")], 16, 16, window=4, fps=10, seed=0)
    try:
        page = build_page(server, (16, 16))
        kinds = signatures(page)
        assert {fn.api_name: kinds.get(i) for i, fn in page.fns.items()} == {
            "js_fn": None,  # the capture time is taken in the browser: nothing to call on the server
            "on_webcam": ("image", "time"), "on_fuse": ("file",), "on_sample": (), "on_play": ("file",),
            "on_start": (), "on_stop": (), "on_reset": (), "on_fps": ("number 1 30",), "on_seed": ("number",),
            "player": (), "on_unload": ()}
    finally:
        server.shutdown()


def test_page_is_served_locally_and_uploads_are_capped():
    worker = Worker(SimpleNamespace(), "fake:0")  # no stream starts here: the engine is never called
    server = StreamServer([worker], 16, 16, window=4, fps=10, seed=0)
    port = free_port()
    page = launch(server, (16, 16), port=port, max_upload_mb=0.01, block=False, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert page.server_name == "127.0.0.1"
        html = httpx.get(url + "/", timeout=30).text
        assert "PersonaLive online" in html
        upload = url + "/gradio_api/upload"
        small = httpx.post(upload, files={"files": ("small.png", b"x" * 1000)}, timeout=30)
        assert small.status_code == 200
        big = httpx.post(upload, files={"files": ("big.png", b"x" * 50_000)}, timeout=30)  # > 0.01 MB
        assert big.status_code == 413
    finally:
        page.close()
        server.shutdown()


def test_cli_refuses_a_taken_port_before_loading_models(tiny_weights, caplog):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("inference_online", ROOT / "inference_online.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    caplog.set_level(logging.INFO)
    common = ["--config", str(ROOT / "configs/prompts/tiny.yaml"), f"weights_dir={tiny_weights}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert module.main(common + ["--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in caplog.text
    assert "read " not in caplog.text and "engine ready" not in caplog.text  # no model was loaded
    assert module.main(common + ["--port", str(free_port()), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb 0.0: must be positive" in caplog.text
