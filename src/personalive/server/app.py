"""The web page (gradio, served by Python alone): reference upload, webcam or video in, live animation out.

Layout and glue only. Each handler finds the tab's `Session` by gradio's session hash and calls one method; the
engines run in `worker.py`. Webcam frames arrive through gradio's streaming webcam (`Image.stream`), each with its
capture time on the browser's clock; animated frames leave through one long-running generator per tab (started on
page load, ended on unload) that yields each paced frame as an inline JPEG carrying that capture time, so nothing
piles up in gradio's file cache and the page script `screen_latency.js` can measure capture to screen. The same
paced frames go to the outputs beyond the page (`outputs.py`: the output view at /output, a virtual camera, a network
stream), and the page shows which are on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from importlib import resources
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image
from starlette.middleware import Middleware

from personalive.errors import ConfigError, ImageReadError, NoFaceError, ServerBusyError, VideoReadError
from personalive.io.faces import FaceFinder
from personalive.io.images import load_image
from personalive.io.reference import frame_reference_around_face
from personalive.io.samples import sample_reference
from personalive.server.guard import Limits, Pages, RequestGuard, check_image_file, check_video_file
from personalive.server.output_view import add_output_view
from personalive.server.outputs import OutputHub
from personalive.server.session import OutputFrame
from personalive.server.worker import FIRST_STATUS, StreamServer

logger = logging.getLogger(__name__)

WEBCAM_FPS = 30  # how often the page may send webcam frames; the driving FPS slider samples from them
PREVIEW_SIDE = 256  # px; smaller fused references are shown enlarged
READOUT_EVERY = 0.25  # s between updates of the status and stats lines
# a js-only listener runs on every webcam frame (the `js` of the Python listener runs on the first one only), and
# the next listener of the same event reads its output: the capture time of that very frame
CAPTURE_JS = "() => performance.timeOrigin + performance.now()"
SCREEN_EMPTY = '<span class="pl-readout">latency capture→screen p50 – ms, p95 – ms (webcam only)</span>'
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
NOT_CONNECTED = "This page is not connected to the server (it was closed or timed out); reload the page."
PAGE_GONE_AFTER = 20.0  # s without the page's heartbeat and queue-data connections: its session closes
DELETE_CACHE = (600, 3600)  # s: every 10 minutes, uploads and previews older than an hour leave gradio's cache
EMPTY_OUTPUT = '<div class="pl-empty">The animation appears here.</div>'
CSS = """
#pl-output img { width: 100%; max-width: 512px; aspect-ratio: 1; display: block; margin: auto; }
#pl-output .pl-empty { aspect-ratio: 1; max-width: 512px; margin: auto; display: flex; align-items: center;
  justify-content: center; border: 1px dashed var(--border-color-primary); color: var(--body-text-color-subdued); }
#pl-screen-latency .html-container { padding: 0; }
"""


def _text(name: str) -> str:
    return resources.files("personalive.server").joinpath(name).read_text(encoding="utf-8")


def _frame_html(frame: OutputFrame) -> str:
    captured = None if frame.stamp is None else frame.stamp.captured
    extra = "" if captured is None else f' data-captured="{captured:.1f}"'
    return (f'<img class="pl-frame" alt="animated frame" data-frame="{frame.index}"{extra} '
            f'src="data:image/jpeg;base64,{frame.jpeg}">')


def _preview(image: Image.Image, side: int = PREVIEW_SIDE) -> np.ndarray:
    """The fused reference for display, enlarged (pixels kept sharp) when the model works at a small size."""
    if max(image.size) < side:
        scale = side // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return np.asarray(image)


def build_page(server: StreamServer, reference_size: tuple[int, int], faces: FaceFinder | None = None,
               outputs: OutputHub | None = None, limits: Limits | None = None,
               pages: Pages | None = None) -> gr.Blocks:
    """The page for `server`; references are cropped to `reference_size` (height, width) around the face; animated
    frames also go to `outputs`; uploads larger than `limits` are refused before they are decoded; with `pages` (the
    request guard's), the session of a page that lost its connections closes after PAGE_GONE_AFTER s."""
    settings = server.settings
    outputs = outputs or OutputHub()
    limits = limits or Limits()
    players: dict[str, int] = {}  # session -> the player that serves it (a replayed page load takes over)

    def session(request: gr.Request):
        """The tab's session, opened by its player, or here when the page acts before its player has started; a
        request of a tab that is closed or not connected is a clean error (no traceback in the log)."""
        key = request.session_hash
        s = server.get(key)
        if s is None and (pages is None or pages.connected(key, time.monotonic(), PAGE_GONE_AFTER)):
            try:
                s = server.session(key)
            except ServerBusyError as e:
                raise gr.Error(f"Server full: {e}", print_exception=False) from e
        if s is None or s.closed:
            raise gr.Error(NOT_CONNECTED, print_exception=False)
        return s

    def on_webcam(frame: np.ndarray | None, captured: float | None, request: gr.Request) -> None:
        if frame is not None:
            session(request).push_webcam(frame, time.monotonic(), captured)

    def fuse(image_path: str | Path | None, request: gr.Request, sample: bool = False):
        s = session(request)
        if image_path is None:
            s.notice = "Choose a reference image first (or press Use sample)."
            return gr.skip(), server.status(s)
        name = "the sample" if sample else Path(image_path).name
        try:
            check_image_file(image_path, limits)  # a huge image is refused from its header, before decoding
            image = frame_reference_around_face(load_image(image_path), *reference_size, faces)
        except (ImageReadError, NoFaceError) as e:
            s.notice = str(e).replace(str(image_path), name)  # no server paths on the page
            return gr.skip(), server.status(s)
        s.notice = ""
        s.set_reference(image)
        logger.info("session %s: new reference %s", s.key[:8], name)
        return _preview(image), server.status(s)

    def on_fuse(image_path: str | None, request: gr.Request):
        return fuse(image_path, request)

    def on_sample(request: gr.Request):
        return fuse(sample_reference(), request, sample=True)

    def on_play(video_path: str | None, request: gr.Request) -> str:
        s = session(request)
        if not video_path:
            s.notice = "Upload a driving video first."
        elif s.reference is None:
            s.notice = "Fuse a reference portrait first."
        else:
            try:
                check_video_file(video_path, limits)
                s.play_video(video_path)
                s.notice = ""
            except VideoReadError as e:
                s.notice = str(e).replace(str(video_path), Path(video_path).name)
        return server.status(s)

    def on_stop(request: gr.Request) -> str:
        s = session(request)
        s.stop()
        server.update(s, time.monotonic())
        return server.status(s)

    def on_start(request: gr.Request) -> str:
        s = session(request)
        s.start()
        return server.status(s)

    def on_reset(request: gr.Request) -> str:
        s = session(request)
        s.restart()
        return server.status(s)

    def on_fps(fps: float | None, request: gr.Request) -> None:
        if fps is not None:
            session(request).set_fps(min(max(float(fps), 1.0), WEBCAM_FPS))  # the slider's range

    def on_seed(seed: float | None, request: gr.Request) -> None:
        if seed is not None:
            session(request).set_seed(int(seed))

    async def player(request: gr.Request):
        """Runs while the tab is open: slot bookkeeping, paced frames out, readout every READOUT_EVERY s."""
        try:
            s = server.session(request.session_hash)  # the tab's session opens here
        except ServerBusyError as e:
            yield gr.skip(), f"**Server full:** {e}", gr.skip(), gr.skip()
            return
        turn = players[s.key] = players.get(s.key, 0) + 1
        shown_frame, shown_status, shown_stats, shown_outputs = EMPTY_OUTPUT, None, None, None
        next_readout = 0.0
        while not s.closed and players.get(s.key) == turn:
            now = time.monotonic()
            if pages is not None and not pages.connected(s.key, now, PAGE_GONE_AFTER):
                logger.info("session %s: its page is gone (no connection for %.0f s)", s.key[:8], PAGE_GONE_AFTER)
                server.close_session(s.key)
                break
            server.update(s, now)
            frame = s.next_output(now)
            if frame is not None:
                outputs.offer(s.key, frame, now)
                shown_frame = _frame_html(frame)
            readout = shown_status, shown_stats, shown_outputs
            if now >= next_readout:
                next_readout = now + READOUT_EVERY
                shown_status, shown_stats = server.status(s), s.stats_text(now)
                shown_outputs = outputs.status(s.key, now)
            if frame is not None or (shown_status, shown_stats, shown_outputs) != readout:
                # unchanged outputs are sent again rather than skipped: gradio keeps the component it builds for
                # every gr.skip() (one per skipped output per frame, a leak), and streamed outputs travel as diffs
                yield tuple(gr.skip() if x is None else x for x in (shown_frame, shown_status, shown_stats,
                                                                    shown_outputs))
            wait = s.wait_time(time.monotonic())
            idle = READOUT_EVERY if s.worker is None else 0.05  # a page without a stream costs the server less
            await asyncio.sleep(idle if wait is None else min(wait, 0.05))
        if players.get(s.key) == turn:
            del players[s.key]

    def on_unload(request: gr.Request) -> None:
        server.close_session(request.session_hash)

    with gr.Blocks(title="PersonaLive online", analytics_enabled=False, delete_cache=DELETE_CACHE) as page:
        gr.Markdown(_text("page.md"))
        status = gr.Markdown(FIRST_STATUS, elem_id="pl-status")
        with gr.Row(equal_height=False):
            with gr.Column():
                reference_file = gr.File(label="Reference portrait (image)", file_types=["image"], type="filepath",
                                         elem_id="pl-reference-file", height=120)
                with gr.Row():
                    fuse_button = gr.Button("Fuse", variant="primary", elem_id="pl-fuse")
                    sample_button = gr.Button("Use sample", elem_id="pl-sample")
                reference_view = gr.Image(label="Fused reference", interactive=False, elem_id="pl-reference",
                                          height=240)
            with gr.Column():
                webcam = gr.Image(label="Webcam (press Record to start)", sources=["webcam"], streaming=True,
                                  type="numpy", webcam_options=gr.WebcamOptions(mirror=True), elem_id="pl-webcam")
                video = gr.Video(label="Driving video (instead of the webcam)", sources=["upload"],
                                 include_audio=True, elem_id="pl-video", height=200)  # False needs ffmpeg
                play_button = gr.Button("Play video", elem_id="pl-play")
                captured = gr.Number(visible=False, precision=None)  # ms, browser clock: the webcam frame's capture
            with gr.Column():
                output = gr.HTML(EMPTY_OUTPUT, label="Animation", elem_id="pl-output")
                gr.HTML(SCREEN_EMPTY, elem_id="pl-screen-latency")  # written by screen_latency.js
                stats = gr.Markdown("", elem_id="pl-stats")
                outputs_line = gr.Markdown("", elem_id="pl-outputs")
                with gr.Row():
                    start_button = gr.Button("Start", elem_id="pl-start")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="pl-stop")
                    reset_button = gr.Button("Reset", elem_id="pl-reset")
                with gr.Row():
                    fps = gr.Slider(1, WEBCAM_FPS, value=settings["fps"], step=1, label="Driving FPS",
                                    elem_id="pl-fps")
                    seed = gr.Number(settings["seed"], precision=0, label="Seed", elem_id="pl-seed")
        with gr.Accordion("How it works", open=False):
            gr.Markdown(_text("help.md"))

        quick = dict(concurrency_limit=None, show_progress="hidden")
        every = dict(stream_every=1 / WEBCAM_FPS, time_limit=None)
        webcam.stream(None, outputs=[captured], js=CAPTURE_JS, **every, **quick)  # first: see CAPTURE_JS
        webcam.stream(on_webcam, inputs=[webcam, captured], outputs=None, **every, **quick)
        decode = dict(concurrency_limit=2, concurrency_id="decode", show_progress="minimal")  # bounded memory
        fuse_button.click(on_fuse, inputs=[reference_file], outputs=[reference_view, status], **decode)
        sample_button.click(on_sample, outputs=[reference_view, status], **decode)
        play_button.click(on_play, inputs=[video], outputs=[status], **quick)
        start_button.click(on_start, outputs=[status], **quick)
        stop_button.click(on_stop, outputs=[status], **quick)
        reset_button.click(on_reset, outputs=[status], **quick)
        fps.change(on_fps, inputs=[fps], **quick)
        seed.change(on_seed, inputs=[seed], **quick)
        page.load(player, outputs=[output, status, stats, outputs_line], **quick)
        page.unload(on_unload)
    return page


def signatures(page: gr.Blocks) -> dict[int, tuple[str, ...]]:
    """Each event handler of `page` (gradio's fn_index) -> the kind of each input (guard.INPUT_KINDS, a slider
    with its range), for the request guard."""

    def kind(component: gr.components.Component) -> str:
        if isinstance(component, gr.File | gr.Video):
            return "file"
        if isinstance(component, gr.Image):
            return "image"
        if isinstance(component, gr.Number) and not component.visible:
            return "time"  # the webcam frame's capture time
        if isinstance(component, gr.Slider):
            return f"number {component.minimum:g} {component.maximum:g}"  # gradio refuses others with a traceback
        return "number" if isinstance(component, gr.Number) else "any"

    return {fn_id: tuple(kind(c) for c in fn.inputs) for fn_id, fn in page.fns.items()
            if fn.fn is not None}  # an event that runs in the browser alone has nothing to call here


def check_address(host: str, port: int) -> None:
    """Fail before any model loads when host:port cannot be served (a bad port, a taken port, an unknown host).

    Raises:
        ConfigError: naming the address and the fix.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port; use 1-65535 (default 7860)")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no clash
            probe.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror or e}); pass a free --port or another "
                          f"--host") from e


def launch(server: StreamServer, reference_size: tuple[int, int], host: str = "127.0.0.1", port: int = 7860,
           max_upload_mb: float = 50, block: bool = True, quiet: bool = False,
           outputs: OutputHub | None = None, limits: Limits | None = None) -> gr.Blocks:
    """Serve the page (and the output view of `outputs`) on host:port; with `block` until Ctrl-C (then the workers
    and outputs stop), else in the background. `limits` (default: the guard's, with `max_upload_mb`) caps what
    requests and uploads may hold.

    Raises:
        ConfigError: the port is taken or the host cannot be bound.
    """
    if host not in LOCAL_HOSTS:
        logger.warning("serving on %s: anyone who can reach this address can use the page and its GPUs "
                       "(there is no login); use --host 127.0.0.1 to keep it local", host)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    faces = FaceFinder()
    outputs = outputs or OutputHub()
    limits = limits or Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    pages = Pages()
    page = build_page(server, reference_size, faces, outputs, limits, pages)
    page.queue(default_concurrency_limit=None, max_size=256)

    def listening(session: str) -> bool:  # gradio answers a page's queue data only while it keeps its messages
        return session in page._queue.pending_messages_per_session
    try:
        page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=True,
                    max_file_size=limits.max_upload_bytes,  # bytes: gradio's "<n>mb" takes integers only
                    app_kwargs={"middleware": [Middleware(RequestGuard, limits=limits, pages=pages,
                                                          signatures=signatures(page), listening=listening)]},
                    prevent_thread_lock=True, quiet=quiet, css=CSS, js=_text("screen_latency.js"),
                    footer_links=["gradio"])
        add_output_view(page.app, outputs)
        address = f"http://{'localhost' if host in LOCAL_HOSTS else host}:{port}"
        logger.info("page %s/ ; outputs: %s", address, outputs.summary(address))
        if block:
            page.block_thread()
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e}); pass a free --port or another --host") from e
    finally:
        if block:
            page.close()
            server.shutdown()
            outputs.close()
            faces.close()
    return page
