"""Requests checked before gradio reads them, and uploads checked before they are decoded.

`RequestGuard` is ASGI middleware in front of the whole page. It answers with a clean 4xx (a JSON `detail` of one
line), before any of gradio's parsing, queueing or decoding:

- **size**: a body longer than the upload limit (`/upload`) or than `Limits.max_json_bytes` (everything else) is
  refused from its Content-Length, or as soon as that many bytes have arrived (413);
- **session ids**: every browser gets a random cookie with its first request, and a gradio session id (the page's
  `session_hash`, in the body, the query or the heartbeat path) belongs to the cookie that used it first; a request
  that names another browser's session is refused (403), and so is one that names an event (a webcam stream, a
  running handler: `stream/<event>`, `cancel`) of another browser's page, so no page can see or control another
  page's stream;
  session ids are short words (400 otherwise), and one address opens at most NEW_SESSIONS_BURST new ones at once
  (then one a second; 429 otherwise), which bounds what a flood of made-up ids costs. `Pages` also tells whether a
  page is still connected, so that the server can close the session of a page that vanished without saying so;
- **files**: a file input must name a file this browser uploaded (403 otherwise), never another page's upload or
  a path on the server;
- **events**: a page starts at most EVENTS_BURST events (`queue/join`) at once, then EVENTS_PER_S (429 otherwise):
  gradio keeps every started webcam stream open until the page closes;
- **images inside requests** (the webcam's frames travel as `data:` URLs): refused when they are not an image or
  their header claims more than `Limits.max_frame_pixels` pixels (413), so a decompression bomb is never decoded;
- a body of the page's JSON endpoints that is not JSON (400);
- a page's queue-data stream when the server keeps no message queue for it (it never started an event, or its
  stream ended and gradio dropped its queue): 404 before the stream starts (gradio would answer 200 and then fail
  mid-stream, with a traceback in the log for every poll);
- gradio's API routes that the page never calls (`run/`, `api/`, `call/`: 404): they would run the page's handlers
  outside any page, and `call/<name>/<event>` reads any event's messages by its id alone.

`check_image_file` and `check_video_file` do the same for uploaded files (a reference portrait, a driving video)
from their headers, before the handlers decode them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException

from personalive.errors import ImageReadError, VideoReadError, reason

logger = logging.getLogger(__name__)

COOKIE = "personalive_client"
API = "/gradio_api"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # the page's are 11 characters of [a-z0-9]
MULTIPART_SLACK = 64 * 1024  # bytes of multipart framing allowed on top of the upload limit
MAX_OWNERS = 10_000  # session ids remembered (oldest forgotten first)
NEW_SESSIONS_BURST, NEW_SESSIONS_PER_S = 60, 1.0  # new session ids per client address: a tab is one; floods wait
EVENTS_BURST, EVENTS_PER_S = 40, 4.0  # events (queue/join) per session: a page starts one per click


@dataclass(frozen=True)
class Limits:
    """What the server accepts.

    Args:
        max_upload_bytes: an uploaded file (`--max-upload-mb`); max_json_bytes: any other request body (a webcam
        frame is one); max_pixels: width x height of an uploaded image or video frame (50 MP: a 48 MP phone photo
        passes); max_frame_pixels: of an image inside a request (a webcam frame: 4K).
    """

    max_upload_bytes: int = 50 * 1024 * 1024
    max_json_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_frame_pixels: int = 3840 * 2160


class Refused(Exception):
    """A request the guard answers itself: HTTP `status` and a one-line `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class _Page:
    owner: str  # the browser (cookie) that used the session id first
    streams: int = 0  # open heartbeat and queue-data connections
    changed: float = 0.0  # time.monotonic() of the last connect or disconnect (or of the first request)
    events: float = EVENTS_BURST  # events the page may still start (refilled at EVENTS_PER_S)
    joined: bool = False  # it started an event: gradio has a message queue for it
    spent: float = 0.0  # when `events` was last updated


class Pages:
    """The pages (browser tabs) the guard has seen: which browser owns each session id, and whether the page is
    still connected. A page keeps two long requests open (gradio's heartbeat and its queue-data stream) for as long
    as it lives; a page with neither for a while is gone, whether it closed, crashed or never was a page.
    Thread-safe; remembers the newest `capacity` session ids."""

    def __init__(self, capacity: int = MAX_OWNERS, burst: int = NEW_SESSIONS_BURST, rate: float = NEW_SESSIONS_PER_S):
        self.capacity, self.burst, self.rate = capacity, burst, rate
        self._pages: OrderedDict[str, _Page] = OrderedDict()
        self._events: OrderedDict[str, str] = OrderedDict()  # event id -> the session that started it
        self._uploads: OrderedDict[str, str] = OrderedDict()  # uploaded file's server path -> the browser's cookie
        self._budget: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, when)
        self._lock = threading.Lock()

    def claim(self, session: str, client: str, address: str = "") -> None:
        """Let `client` (a cookie, from network `address`) use `session`: it owns it now, or did already.

        Raises:
            Refused: 403 another browser owns it; 429 `address` opened more new sessions than its budget
            (`burst`, refilled at `rate` per second).
        """
        with self._lock:
            now = time.monotonic()
            page = self._pages.get(session)
            if page is None:
                tokens, when = self._budget.pop(address, (float(self.burst), now))
                tokens = min(self.burst, tokens + (now - when) * self.rate)
                if tokens < 1:
                    self._budget[address] = (tokens, now)
                    raise Refused(429, "too many new pages from this address; wait a minute")
                self._remember(self._budget, address, (tokens - 1, now))
                page = self._pages[session] = _Page(client, changed=now)
            self._pages.move_to_end(session)
            while len(self._pages) > self.capacity:
                self._pages.popitem(last=False)
            if page.owner != client:
                raise Refused(403, "this session belongs to another page; reload the page")

    def start_event(self, session: str) -> None:
        """`session` starts an event (a queue/join).

        Raises:
            Refused: 429 more than EVENTS_BURST at once (then EVENTS_PER_S).
        """
        with self._lock:
            page = self._pages.get(session)
            if page is None:
                return
            now = time.monotonic()
            page.events = min(EVENTS_BURST, page.events + (now - (page.spent or now)) * EVENTS_PER_S)
            page.spent = now
            if page.events < 1:
                raise Refused(429, "too many calls from this page; slow down")
            page.events -= 1
            page.joined = True

    def _remember(self, table: OrderedDict, key: str, value: Any) -> None:
        """table[key] = value as its newest entry, the oldest forgotten beyond `capacity` (the lock held)."""
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def add_upload(self, path: str, client: str) -> None:
        """`client` uploaded the file now at `path` (from gradio's answer to /upload)."""
        with self._lock:
            self._remember(self._uploads, path, client)

    def uploaded(self, path: str, client: str) -> bool:
        """Whether `client` uploaded the file at `path`: a page hands the server only its own uploads."""
        with self._lock:
            return self._uploads.get(path) == client

    def add_event(self, event: str, session: str) -> None:
        """`session` started `event` (gradio's event id, from its answer to queue/join)."""
        with self._lock:
            self._remember(self._events, event, session)

    def check_event(self, event: str, client: str) -> None:
        """`client` may send to, close or cancel `event` only if its own page started it.

        Raises:
            Refused: 404 an event the guard never saw start; 403 another browser's event.
        """
        with self._lock:
            session = self._events.get(event)
            page = self._pages.get(session) if session is not None else None
            if session is not None:
                self._events.move_to_end(event)  # a live webcam stream is never the oldest forgotten
        if session is None:
            raise Refused(404, "no such event; reload the page")
        if page is None or page.owner != client:
            raise Refused(403, "this event belongs to another page; reload the page")

    def joined(self, session: str) -> bool:
        """Whether `session` started an event (only then may it read its queue-data stream)."""
        with self._lock:
            page = self._pages.get(session)
            return page is not None and page.joined

    def connect(self, session: str, delta: int = 1) -> None:
        """A long request of `session` opened (delta 1) or ended (delta -1)."""
        with self._lock:
            page = self._pages.get(session)
            if page is not None:
                page.streams = max(page.streams + delta, 0)
                page.changed = time.monotonic()

    def connected(self, session: str, now: float, grace: float) -> bool:
        """Whether the page of `session` has a long request open, or had one (or its first request) within `grace`
        seconds of `now` (a page loading or reconnecting)."""
        with self._lock:
            page = self._pages.get(session)
            return page is not None and (page.streams > 0 or now - page.changed < grace)


def image_size(data: bytes | Path) -> tuple[int, int]:
    """(width, height) from an image's header, without decoding its pixels.

    Raises:
        ValueError: not an image Pillow can identify.
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as image:  # reads the header only
            return image.size
    except Image.DecompressionBombError as e:  # Pillow's own limit (far above ours): a bomb
        raise OverflowError(reason(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(re.sub(r" <[^>]*>", "", reason(e))) from e  # not Pillow's "<_io.BytesIO object at 0x...>"


def _too_big(width: int, height: int, max_pixels: int) -> str | None:
    if width * height > max_pixels:
        return (f"{width}x{height} pixels, above the server's limit of {max_pixels / 1e6:.1f} megapixels; "
                f"use a smaller one")
    return None


def check_image_file(path: str | Path, limits: Limits) -> None:
    """Refuse an uploaded image whose header claims more than `limits.max_pixels` (before it is decoded).

    Raises:
        ImageReadError: naming the file, its size and the limit (or why it is not an image).
    """
    path = Path(path)
    try:
        width, height = image_size(path)
    except OverflowError as e:
        raise ImageReadError(f"{path} claims a huge size ({e}); use a smaller image") from e
    except ValueError:
        return  # not an image: the reader says so in its own words
    if problem := _too_big(width, height, limits.max_pixels):
        raise ImageReadError(f"{path} is {problem}")


def check_video_file(path: str | Path, limits: Limits) -> None:
    """Refuse an uploaded video whose frames are larger than `limits.max_pixels` (from its header).

    Raises:
        VideoReadError: naming the file, its frame size and the limit.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return  # the reader names the problem
            codec = container.streams.video[0].codec_context
            width, height = codec.width, codec.height
    except (av.FFmpegError, UnicodeDecodeError, OSError):
        return  # not a video: the reader says so in its own words
    if problem := _too_big(width, height, limits.max_pixels):
        raise VideoReadError(f"{path} has frames of {problem}")


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if depth > 8:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth + 1)


def check_data_urls(body: Any, limits: Limits) -> None:
    """Every `data:` string in a request body must be a base64 image within `limits.max_frame_pixels`.

    Raises:
        Refused: 422 not an image, 413 too many pixels.
    """
    for text in _strings(body):
        if not text.startswith("data:"):
            continue
        header, _, payload = text.partition(",")
        if not header.endswith(";base64"):
            raise Refused(422, "a data: URL that is not base64")
        try:
            raw = base64.b64decode(payload, validate=False)
            width, height = image_size(raw)
        except OverflowError as e:
            raise Refused(413, f"an image that claims a huge size ({e})") from e
        except (ValueError, binascii.Error) as e:
            raise Refused(422, f"a data: URL that is not an image ({reason(e, 80)})") from e
        if problem := _too_big(width, height, limits.max_frame_pixels):
            raise Refused(413, f"an image of {problem}")


MAX_NUMBER = 1e9  # a number input (FPS, seed, capture time in ms is ~1.8e12: see check_inputs)


def _is_number(value: Any, limit: float = MAX_NUMBER) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= limit


def _is_file(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("path"), str) and len(value["path"]) <= 4096
            and value.get("meta") == {"_type": "gradio.FileData"})


INPUT_KINDS = {
    "file": _is_file,  # an upload (gr.File, gr.Video): gradio's FileData
    "image": lambda v: _is_file(v) or (isinstance(v, dict) and isinstance(v.get("url"), str)  # a webcam frame
                                       and v["url"].startswith("data:image/")),
    "number": lambda v: _is_number(v),  # gr.Number, gr.Slider
    "time": lambda v: _is_number(v, 1e15),  # a capture time, ms of the browser's clock
    "any": lambda v: True,
}


def check_inputs(data: list, kinds: tuple[str, ...], uploaded: Callable[[str], bool] = lambda path: True) -> None:
    """An event's inputs against the kinds its handler takes (INPUT_KINDS, "number LOW HIGH" for a slider's range);
    None is an empty input. A file input must name a file that `uploaded` says this page uploaded.

    Raises:
        Refused: 422 naming the first input that does not fit; 403 a file the page did not upload.
    """
    if len(data) != len(kinds):
        raise Refused(422, f"this event takes {len(kinds)} inputs, got {len(data)}")
    for i, (value, kind) in enumerate(zip(data, kinds, strict=True)):
        name, *bounds = kind.split()
        if value is not None and not INPUT_KINDS[name](value):
            raise Refused(422, f"input {i} must be a {name}")
        if bounds and (value is None or not float(bounds[0]) <= value <= float(bounds[1])):  # a slider is never empty
            raise Refused(422, f"input {i} must be between {bounds[0]} and {bounds[1]}")
        if _is_file(value) and not uploaded(value["path"]):
            raise Refused(403, f"input {i} is not a file this page uploaded; upload it first")


def _session_ids(path: str, query: dict[str, list[str]], body: Any) -> list[str]:
    ids = list(query.get("session_hash", []))
    if path.startswith(f"{API}/heartbeat/"):
        ids.append(path.removeprefix(f"{API}/heartbeat/"))
    if isinstance(body, dict) and "session_hash" in body and body["session_hash"] is not None:
        ids.append(body["session_hash"])
    for sid in ids:
        if not isinstance(sid, str) or not SESSION_ID.match(sid):
            raise Refused(400, "session_hash must be 1-64 letters, digits, - or _")
    return ids


UNUSED_ROUTES = (f"{API}/run/", f"{API}/api/", f"{API}/call/")  # gradio's API for scripts: the page never calls it


def _json_endpoint(path: str) -> bool:
    return path.startswith((f"{API}/queue/join", f"{API}/stream/", f"{API}/cancel", f"{API}/reset"))


class RequestGuard:
    """ASGI middleware: see the module docstring.

    Args:
        app: the gradio app; limits; pages: the pages seen; signatures: the page's event handlers (gradio's
        fn_index) and the kind of each input (see `check_inputs`), when known: a call of another handler, or with
        other inputs, is refused here (gradio answers some with a 500, others with a multi-line error and a
        traceback in the server log); listening: whether the app keeps a message queue for a session id (default:
        whether the page started an event).
    """

    def __init__(self, app: Any, limits: Limits, pages: Pages | None = None,
                 signatures: dict[int, tuple[str, ...]] | None = None, listening: Callable[[str], bool] | None = None):
        self.app, self.limits, self.signatures = app, limits, signatures
        self.pages = pages or Pages()
        self.listening = listening or self.pages.joined

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client, fresh = self._client(scope)
        if fresh:
            send = self._with_cookie(send, client)
        try:
            receive, sessions = await self._check(scope, receive, client)
        except Refused as e:
            await self._refuse(send, e)
            return
        path = scope["path"]
        if sessions and path.startswith(f"{API}/queue/join"):
            send = self._recording(send, lambda answer: self._add_event(answer, sessions[0]))
        elif path.startswith(f"{API}/upload") and scope["method"] == "POST":
            send = self._recording(send, lambda answer: self._add_uploads(answer, client))
        long = sessions and scope["method"] == "GET" and path.startswith((f"{API}/heartbeat/", f"{API}/queue/data"))
        if long:
            self.pages.connect(sessions[0])
        if long and path.startswith(f"{API}/heartbeat/"):
            # Starlette streams for ASGI 2.4 servers without listening for the client leaving, so gradio would
            # notice a closed tab at its next heartbeat write (15 s); as 2.3 it listens, and the tab's unload runs now
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        started = False

        async def send_started(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except (HTTPException, RuntimeError) as e:
            # an HTTP error raised inside a streaming answer (gradio's queue data when the page's message queue went
            # between the check and the stream): the answer has started, so the stream just ends; no traceback
            error = e if isinstance(e, HTTPException) else e.__cause__
            if not started or not isinstance(error, HTTPException):
                raise
            logger.debug("%s %s ended by HTTP %s after its answer started", scope["method"], path, error.status_code)
        finally:
            if long:
                self.pages.connect(sessions[0], -1)

    @staticmethod
    def _client(scope: dict) -> tuple[str, bool]:
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                morsel = SimpleCookie(value.decode("latin-1")).get(COOKIE)
                if morsel is not None and re.fullmatch(r"[A-Za-z0-9_-]{22}", morsel.value):
                    return morsel.value, False
        return secrets.token_urlsafe(16), True

    @staticmethod
    def _with_cookie(send: Any, client: str) -> Any:
        cookie = f"{COOKIE}={client}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return send_with_cookie

    async def _check(self, scope: dict, receive: Any, client: str) -> tuple[Any, list[str]]:
        """Raise Refused, or return the `receive` the app reads the (already read) body from, and the session ids
        the request names."""
        path, method = scope["path"], scope["method"]
        if path.startswith(UNUSED_ROUTES):
            raise Refused(404, "not served: this server's only client is its web page")
        limit = (self.limits.max_upload_bytes + MULTIPART_SLACK if path.startswith(f"{API}/upload")
                 else self.limits.max_json_bytes)
        headers = dict(scope.get("headers", []))
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            raise Refused(400, "Content-Length is not a number") from None
        if length > limit:
            raise Refused(413, f"request body of {length} bytes, above the server's limit of {limit}")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        body: Any = None
        if method == "POST" and _json_endpoint(path):
            raw = await self._read(receive, limit)
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, UnicodeDecodeError):
                raise Refused(400, "the request body is not JSON") from None
            receive = self._replay(raw, receive)
        elif method == "POST":
            receive = self._capped(receive, limit)
        if path.startswith(f"{API}/queue/join") or (path.startswith(f"{API}/stream/") and method == "POST"
                                                    and not path.endswith("/close")):
            self._check_call(body, client)
        sessions = _session_ids(path, query, body)
        address = (scope.get("client") or ("", 0))[0]
        for sid in sessions:
            self.pages.claim(sid, client, address)
        if sessions and path.startswith(f"{API}/queue/join"):
            self.pages.start_event(sessions[0])
        if method == "POST" and path.startswith(f"{API}/stream/"):  # a webcam frame, or the end of the stream
            self.pages.check_event(path.removeprefix(f"{API}/stream/").removesuffix("/close"), client)
        if path.startswith(f"{API}/cancel") and isinstance(body, dict) and isinstance(body.get("event_id"), str):
            self.pages.check_event(body["event_id"], client)  # gradio cancels an event by its id alone
        if path.startswith(f"{API}/queue/data") and not (sessions and self.listening(sessions[0])):
            raise Refused(404, "this page has no events pending; reload the page")  # (gradio fails on it mid-stream)
        if body is not None:
            check_data_urls(body.get("data") if isinstance(body, dict) else body, self.limits)
        return receive, sessions

    def _check_call(self, body: Any, client: str) -> None:
        """The shape gradio assumes of an event's body (queue/join, a webcam stream's next frame)."""
        if not isinstance(body, dict):
            raise Refused(422, "the body must be a JSON object")
        fn = body.get("fn_index")
        if not isinstance(fn, int) or isinstance(fn, bool) or (self.signatures is not None and fn not in self.signatures):
            raise Refused(422, "fn_index must be one of the page's events")
        if not isinstance(body.get("data", []), list) or not isinstance(body.get("session_hash"), str):
            raise Refused(422, "data must be a list and session_hash a string")
        if self.signatures is not None:
            check_inputs(body.get("data", []), self.signatures[fn], lambda path: self.pages.uploaded(path, client))

    def _add_event(self, answer: Any, session: str) -> None:
        if isinstance(answer, dict) and isinstance(answer.get("event_id"), str):
            self.pages.add_event(answer["event_id"], session)

    def _add_uploads(self, answer: Any, client: str) -> None:
        for path in answer if isinstance(answer, list) else []:
            if isinstance(path, str):
                self.pages.add_upload(path, client)

    @staticmethod
    def _recording(send: Any, record: Callable[[Any], None]) -> Any:
        """`send` that also hands a successful JSON answer (a queue/join's event id, an upload's paths) to `record`."""
        status, chunks = 0, []

        async def send_recording(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200:
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    try:
                        record(json.loads(b"".join(chunks)))
                    except ValueError:
                        pass  # not JSON: nothing to record
            await send(message)

        return send_recording

    @staticmethod
    async def _read(receive: Any, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Refused(400, "the request ended early")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"request body above the server's limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(raw: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    def _capped(receive: Any, limit: int) -> Any:
        """A body without (or with a false) Content-Length cannot grow past `limit` either: the app sees it end."""
        size = 0

        async def capped() -> dict:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    return {"type": "http.disconnect"}
            return message

        return capped

    @staticmethod
    async def _refuse(send: Any, error: Refused) -> None:
        body = json.dumps({"detail": error.detail}).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
