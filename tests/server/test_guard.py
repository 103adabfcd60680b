"""The request guard in front of the page, against a stub app: bodies over the limits, session ids used by another
browser, floods of new pages and events, images whose header claims a huge size, event inputs of the wrong kind;
and uploaded files checked from their headers before they are decoded."""

import numpy as np
import pytest
from conftest import write_video
from starlette.exceptions import HTTPException
from starlette.testclient import TestClient

from personalive.errors import ImageReadError, VideoReadError
from personalive.server import guard
from personalive.server.client import as_data_url, jpeg_header, png_header
from personalive.server.guard import EVENTS_BURST, Limits, Pages, Refused, RequestGuard, check_image_file

API = "/gradio_api"
SIGNATURES = {0: ("image", "time"), 1: ("number",), 2: ("file",), 3: (), 4: ("number 1 30",)}
LIMITS = Limits(max_upload_bytes=10_000, max_json_bytes=5_000, max_pixels=1_000_000, max_frame_pixels=100_000)


class StubApp:
    """Answers 200 with the body's length (as gradio: a queue/join with a new event id, an upload with the path of
    its file); records every request."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.seen.append(scope["path"])
        body = str(size).encode()
        if scope["path"] == f"{API}/queue/join":
            body = b'{"event_id": "event%d"}' % len(self.seen)
        elif scope["path"] == f"{API}/upload":
            body = b'["uploads/%d/portrait.png"]' % len(self.seen)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def app():
    stub = StubApp()
    pages = Pages(burst=5, rate=1.0)
    middleware = RequestGuard(stub, LIMITS, pages, SIGNATURES)
    return stub, pages, middleware


def browser(middleware) -> TestClient:
    """A browser: it keeps the guard's cookie from its first request on."""
    client = TestClient(middleware)
    client.get("/")
    return client


def join(client: TestClient, session: str, data=None, fn: int = 3, **extra):
    return client.post(f"{API}/queue/join", json={"data": [] if data is None else data, "fn_index": fn,
                                                  "session_hash": session, **extra})


def test_a_fresh_browser_gets_a_private_cookie(app):
    _, _, middleware = app
    response = TestClient(middleware).get("/")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{guard.COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_bodies_over_the_limits_are_refused_before_the_app_reads_them(app):
    stub, _, middleware = app
    client = browser(middleware)
    stub.seen.clear()
    response = client.post(f"{API}/upload", content=b"x" * 80_000, headers={"content-type": "multipart/form-data"})
    assert response.status_code == 413 and "above the server's limit" in response.json()["detail"]
    response = client.post(f"{API}/queue/join", content=b"[" * 6_000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    chunks = (b" " * 1000 for _ in range(10))  # no Content-Length: refused as soon as the limit is passed
    assert client.post(f"{API}/queue/join", content=chunks).status_code == 413
    assert stub.seen == []
    assert client.post(f"{API}/queue/join", content=b"{", headers={"content-type": "application/json"}).json() == {
        "detail": "the request body is not JSON"}
    assert join(client, "page1").status_code == 200 and stub.seen == [f"{API}/queue/join"]


def test_a_session_belongs_to_the_browser_that_used_it_first(app):
    stub, _, middleware = app
    mine, theirs = browser(middleware), browser(middleware)
    assert join(mine, "victim").status_code == 200
    stub.seen.clear()
    calls = [join(theirs, "victim"), theirs.get(f"{API}/heartbeat/victim"),
             theirs.get(f"{API}/queue/data", params={"session_hash": "victim"}),
             theirs.post(f"{API}/stream/abc", json={"data": [], "fn_index": 3, "session_hash": "victim"}),
             theirs.post(f"{API}/cancel", json={"session_hash": "victim", "event_id": "x"})]
    for response in calls:
        assert response.status_code == 403, response.text
        assert response.json() == {"detail": "this session belongs to another page; reload the page"}
    assert stub.seen == []  # none of it reached the page
    assert TestClient(middleware).get(f"{API}/heartbeat/victim").status_code == 403  # no cookie: a new browser
    assert mine.get(f"{API}/queue/data", params={"session_hash": "victim"}).status_code == 200
    for bad in ("", "x" * 65, "../etc", "a b", "ü"):  # not a session id
        assert join(mine, bad).status_code == 400
    assert join(mine, None).status_code == 422  # the session id is not a string


def test_event_inputs_must_fit_the_handler(app):
    _, _, middleware = app
    client, other = browser(middleware), browser(middleware)
    frame = {"url": as_data_url(png_header(64, 48))}
    path = client.post(f"{API}/upload", files={"files": ("portrait.png", b"x")}).json()[0]
    file = {"path": path, "meta": {"_type": "gradio.FileData"}}
    good = [(0, [frame, 1.7e12]), (0, [None, None]), (1, [12.5]), (2, [file]), (3, []), (4, [1]), (4, [30.0])]
    for fn, data in good:
        assert join(client, "page1", data, fn).status_code == 200, (fn, data)
    bad = [(9, []), (-1, []), ("0", []), (True, []), (3, [1]), (1, []), (1, ["7"]), (1, [True]), (1, [1e308]),
           (1, [[1]]), (2, [{"path": "/etc/passwd"}]), (2, ["/etc/passwd"]), (0, [{"url": "http://x/y.png"}, 1.0]),
           (0, [frame, "now"]), (4, [0]), (4, [30.5]), (4, [-1e9]), (4, [None])]
    for fn, data in bad:
        response = join(client, "page1", data, fn)
        assert response.status_code == 422 and "\n" not in response.json()["detail"], (fn, data, response.text)
    for page, path in ((client, "/etc/passwd"), (client, "../../etc/passwd"), (other, file["path"])):
        response = join(page, "page1" if page is client else "page2", [{**file, "path": path}], 2)
        assert response.status_code == 403 and "not a file this page uploaded" in response.json()["detail"]
    assert join(client, "page1", fn=3, data="x").status_code == 422  # data must be a list
    assert client.post(f"{API}/queue/join", json=[1, 2]).status_code == 422  # not an object


def test_images_inside_requests_are_checked_from_their_headers(app):
    _, _, middleware = app
    client = browser(middleware)
    cases = {
        as_data_url(png_header(60000, 60000)): (413, "claims a huge size"),  # a decompression bomb
        as_data_url(jpeg_header(60000, 60000), "image/jpeg"): (413, "claims a huge size"),
        as_data_url(png_header(1000, 1000)): (413, "1000x1000 pixels, above the server's limit of 0.1 megapixels"),
        as_data_url(b"hello", "image/png"): (422, "not an image"),
        "data:image/png,notbase64": (422, "not base64"),
    }
    for data_url, (status, words) in cases.items():
        response = join(client, "page1", [{"url": data_url}, 1.0], fn=0)
        assert response.status_code == status and words in response.json()["detail"], response.text
    assert join(client, "page1", [{"url": as_data_url(png_header(300, 200))}, 1.0], fn=0).status_code == 200


def test_new_pages_per_address_and_events_per_page_are_rate_limited(app, clock):
    _, pages, middleware = app
    client = browser(middleware)
    for i in range(5):
        assert join(client, f"page{i}").status_code == 200
    response = join(client, "page5")
    assert response.status_code == 429 and "too many new pages" in response.json()["detail"]
    assert join(client, "page0").status_code == 200  # a page seen before is not new
    clock[0] += 1.0  # one more a second
    assert join(client, "page5").status_code == 200 and join(client, "page6").status_code == 429
    for _ in range(EVENTS_BURST):  # its budget refilled in that second
        assert join(client, "page0").status_code == 200
    assert join(client, "page0").status_code == 429
    clock[0] += 1.0
    assert join(client, "page0").status_code == 200


def test_the_event_stream_of_a_page_without_events_is_refused(app):
    _, _, middleware = app
    client = browser(middleware)
    client.get(f"{API}/heartbeat/page1")
    assert client.get(f"{API}/queue/data", params={"session_hash": "page1"}).status_code == 404
    join(client, "page1")
    assert client.get(f"{API}/queue/data", params={"session_hash": "page1"}).status_code == 200


def test_the_event_stream_of_a_page_whose_messages_the_app_dropped_is_refused():
    """gradio drops a page's message queue when its stream is cut; a poll then gets a clean 404 before any answer,
    not a stream that fails once started (a traceback in the log per poll)."""
    listening = set()
    middleware = RequestGuard(StubApp(), LIMITS, Pages(), SIGNATURES, listening=listening.__contains__)
    client = browser(middleware)
    join(client, "page1")
    response = client.get(f"{API}/queue/data", params={"session_hash": "page1"})
    assert response.status_code == 404 and response.json() == {"detail": "this page has no events pending; reload the page"}
    listening.add("page1")
    assert client.get(f"{API}/queue/data", params={"session_hash": "page1"}).status_code == 200


def test_an_http_error_inside_a_started_stream_ends_it_quietly():
    """The queue went between the guard's check and the stream (gradio raises 404 with the answer started): the
    stream ends without an exception reaching the server (which would log a traceback)."""

    async def failing_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise RuntimeError("Caught handled exception, but response already started.") from HTTPException(404)

    client = browser(RequestGuard(failing_stream, LIMITS, Pages(), SIGNATURES, listening=lambda session: True))
    response = client.get(f"{API}/queue/data", params={"session_hash": "page1"})
    assert response.status_code == 200 and response.text == "data: {}\n\n"


def test_a_page_is_connected_while_it_holds_a_long_request(clock):
    pages = Pages()
    pages.claim("page1", "browser1")
    assert pages.connected("page1", clock[0] + 5, grace=10)  # just loaded
    assert not pages.connected("page1", clock[0] + 11, grace=10)
    pages.connect("page1")
    assert pages.connected("page1", clock[0] + 100, grace=10)
    clock[0] += 100
    pages.connect("page1", -1)
    assert pages.connected("page1", clock[0] + 9, grace=10) and not pages.connected("page1", clock[0] + 11, grace=10)
    assert not pages.connected("never-seen", clock[0], grace=10)
    with pytest.raises(Refused) as e:
        pages.claim("page1", "browser2")
    assert e.value.status == 403


def test_uploaded_files_are_checked_from_their_headers(tmp_path):
    limits = Limits(max_pixels=1_000_000)
    for name, raw, words in (("big.png", png_header(2000, 1000), "2000x1000 pixels, above the server's "
                                                                               "limit of 1.0 megapixels"),
                             ("bomb.jpg", jpeg_header(60000, 60000), "claims a huge size")):
        path = tmp_path / name
        path.write_bytes(raw)  # one row of pixels at most: decoding it would fail, the header alone refuses it
        with pytest.raises(ImageReadError, match=f"^{path} .*{words}"):
            check_image_file(path, limits)
    (tmp_path / "notes.png").write_text("not an image")
    check_image_file(tmp_path / "notes.png", limits)  # the reader names that problem in its own words
    check_image_file(tmp_path / "missing.png", limits)
    video = write_video(tmp_path / "wide.mp4", np.zeros((2, 64, 96, 3), np.uint8))
    guard.check_video_file(video, Limits(max_pixels=96 * 64))
    with pytest.raises(VideoReadError, match="wide.mp4 has frames of 96x64 pixels, above the server's limit"):
        guard.check_video_file(video, Limits(max_pixels=96 * 64 - 1))
    guard.check_video_file(tmp_path / "notes.png", limits)  # not a video: the reader says so


def test_an_event_answers_only_to_the_browser_whose_page_started_it(app):
    _, _, middleware = app
    mine, theirs = browser(middleware), browser(middleware)
    event = join(mine, "victim").json()["event_id"]  # the victim's webcam stream, say
    join(theirs, "attacker")
    frame = {"data": [None, None], "fn_index": 0, "event_data": None}
    for path, body in ((f"{API}/stream/{event}", {**frame, "session_hash": "attacker"}),
                       (f"{API}/stream/{event}/close", None),
                       (f"{API}/cancel", {"session_hash": "attacker", "fn_index": 0, "event_id": event})):
        response = theirs.post(path, json=body)
        assert response.status_code == 403, (path, response.text)
        assert response.json() == {"detail": "this event belongs to another page; reload the page"}
        assert mine.post(path, json=body and {**body, "session_hash": "victim"}).status_code == 200
    assert theirs.post(f"{API}/stream/not-an-event", json={**frame, "session_hash": "attacker"}).status_code == 404


def test_gradio_api_routes_the_page_never_calls_are_not_served(app):
    stub, _, middleware = app
    client = browser(middleware)
    for method, path in (("POST", "run/predict"), ("POST", "api/on_stop"), ("POST", "call/on_stop"),
                         ("GET", "call/player/event1"), ("POST", "call/v2/on_reset")):
        response = client.request(method, f"{API}/{path}", json={"data": []})
        assert response.status_code == 404 and "only client is its web page" in response.json()["detail"]
    assert stub.seen == ["/"]
