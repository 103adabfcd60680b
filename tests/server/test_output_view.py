"""The outputs end to end in headless chromium, with the tiny engine on the CPU: while the main page streams the
webcam, the output view (/output, for an OBS Browser Source) shows frames that change, the page lists its outputs,
and a network stream started with its receiver absent delivers frames once the receiver starts, then retries when
it goes away while the page keeps streaming."""

import time

import pytest
from test_browser import (
    CHROMIUM,
    browser,  # noqa: F401  (the fixture: headless chromium with a fake webcam)
    frame_index,
    open_page,
    start_webcam,
    wait_frames,
    wait_status,
)
from test_network_stream import free_port, rtmp_receiver, wait_until

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: apt-get install -y chromium"),
]

# a hash of the pixels the <img> shows now (MJPEG: the newest frame), or null before the first one
VIEW_PIXELS = """() => {
  const img = document.querySelector('#pl-view');
  if (!img || !img.naturalWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  let hash = 0;
  for (const value of context.getImageData(0, 0, canvas.width, canvas.height).data) hash = (hash * 31 + value) >>> 0;
  return hash;
}"""


@pytest.fixture(scope="module")
def served(tiny_cfg):
    from personalive.server.app import launch
    from personalive.server.outputs import open_outputs
    from personalive.server.worker import build_server

    rtmp = f"rtmp://127.0.0.1:{free_port()}/live/test"  # nobody listens yet
    outputs = open_outputs(tiny_cfg.width, tiny_cfg.height, 30, stream_url=rtmp)
    outputs.stream.retry = outputs.stream.max_retry = 0.5
    server = build_server(tiny_cfg, ["cpu"])
    port = free_port()
    page = launch(server, (tiny_cfg.reference_image_height, tiny_cfg.reference_image_width), host="127.0.0.1",
                  port=port, block=False, quiet=True, outputs=outputs)
    try:
        yield f"http://127.0.0.1:{port}/", rtmp, outputs
    finally:
        page.close()
        server.shutdown()
        outputs.close()


def outputs_line(page) -> str:
    return page.inner_text("#pl-outputs")


def test_output_view_and_network_stream_while_the_page_streams(browser, served, tiny_cfg):  # noqa: F811
    url, rtmp, outputs = served
    context, main = open_page(browser, url)
    main.click("#pl-sample")
    wait_status(main, "Ready")
    start_webcam(main)
    wait_frames(main, 1)

    # the output view: the animation alone, full size, frames that change
    view_context = browser.new_context(viewport={"width": 640, "height": 480})
    view = view_context.new_page()
    view.goto(url + "output", wait_until="commit")
    assert view.locator("button, input, textarea, select").count() == 0
    view.wait_for_function(f"() => ({VIEW_PIXELS})() !== null", timeout=90_000)
    box = view.locator("#pl-view").bounding_box()
    assert (box["width"], box["height"]) == (640, 480)  # fills the browser source (the frame is fitted inside)
    hashes = set()
    end = time.monotonic() + 90
    while len(hashes) < 4 and time.monotonic() < end:
        hashes.add(view.evaluate(VIEW_PIXELS))
        time.sleep(0.1)
    assert len(hashes) >= 4, "the output view does not change"

    # the page lists its outputs: this tab is on them, one viewer, the stream waits for its receiver
    main.wait_for_function("() => document.querySelector('#pl-outputs').innerText.includes('1 watching')")
    line = outputs_line(main)
    assert "carry this tab's animation" in line and "virtual camera off" in line
    assert f"stream {rtmp}" in line and "retrying" in line

    # the receiver starts later: frames of the engine's size arrive
    receiver = rtmp_receiver(int(rtmp.split(":")[2].split("/")[0]))
    assert wait_until(lambda: len(receiver.frames) >= 10, timeout=90)
    assert {(w, h) for w, h, _ in receiver.frames} == {(tiny_cfg.width, tiny_cfg.height)}
    main.wait_for_function("() => document.querySelector('#pl-outputs').innerText.includes('sending')")

    # ... and goes away: the stream retries, the page keeps streaming
    receiver.stop()
    main.wait_for_function("() => document.querySelector('#pl-outputs').innerText.includes('retrying')",
                           timeout=90_000)
    shown = frame_index(main)
    wait_frames(main, shown + 8)
    assert "Streaming" in main.inner_text("#pl-status")
    view_context.close()
    context.close()
