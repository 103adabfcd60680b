"""The output-only view: `/output` is a page with nothing but the animation, full size, for an OBS Browser Source;
`/output.mjpg` is the same frames as an MJPEG stream (`multipart/x-mixed-replace`, which browsers show in an
`<img>`, and which ffplay, VLC or an OBS Media Source can open too).

Each viewer is one long response that sends every frame the hub carries (several viewers may watch one stream);
they read the hub's newest frame and never touch the engine or the page's session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse

from personalive.server.outputs import VIEW_PATH, OutputHub

STREAM_PATH = VIEW_PATH + ".mjpg"
BOUNDARY = "personalive-frame"
POLL = 0.01  # s between looks at the hub for a new frame (at most 30 frames/s come)


async def mjpeg_parts(hub: OutputHub, poll: float = POLL) -> AsyncIterator[bytes]:
    """The hub's frames as multipart parts, each closed by the next boundary at once (so a browser shows it without
    waiting for the next frame), for as long as the viewer stays."""
    hub.viewer(True)
    try:
        yield f"--{BOUNDARY}\r\n".encode()
        seen = None
        while True:
            count, jpeg = hub.latest()
            if jpeg is not None and count != seen:
                seen = count
                yield (f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg
                       + f"\r\n--{BOUNDARY}\r\n".encode())
            await asyncio.sleep(poll)
    finally:
        hub.viewer(False)


def add_output_view(app: FastAPI, hub: OutputHub) -> None:
    """Serve the output view of `hub` on `app` (gradio's FastAPI app) at VIEW_PATH and STREAM_PATH."""
    page = resources.files("personalive.server").joinpath("output_view.html").read_text(encoding="utf-8")
    page = page.replace("STREAM_PATH", STREAM_PATH)

    async def view() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def stream() -> StreamingResponse:
        return StreamingResponse(mjpeg_parts(hub), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})

    app.add_api_route(VIEW_PATH, view, methods=["GET"], include_in_schema=False)
    app.add_api_route(STREAM_PATH, stream, methods=["GET"], include_in_schema=False)
