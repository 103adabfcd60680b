"""A browser tab of the web page, in Python: the HTTP calls the page's JavaScript makes, for load, churn and fault
tests (`tools/soak_server.py`, `tests/server/test_reliability.py`); the server never uses it.

The page speaks gradio's `sse_v3` protocol: `GET /` (which sets the guard's cookie), `GET /config` (the event
handlers by name), a long `GET /gradio_api/heartbeat/<session>` (its end closes the session), `POST
/gradio_api/queue/join` per event (the `player` on page load, `on_fuse`, ...), one long `GET
/gradio_api/queue/data?session_hash=<session>` carrying every event's messages, `POST /gradio_api/upload` for
files, and the webcam as one streaming event: its first frame joins, the next ones go to `POST
/gradio_api/stream/<event>`, each a `data:image/jpeg;base64,...` URL with its capture time.

`png_header` and `jpeg_header` make the images hostile tests send: tiny files whose header claims a huge size.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import random
import re
import socket
import string
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

API = "/gradio_api"
FRAME_HTML = re.compile(r'data-frame="(\d+)"(?: data-captured="([\d.]+)")?')


class PageError(Exception):
    """The server answered a call with an error: an HTTP `status` (4xx) and its detail, or an event that ended
    unsuccessfully (`status` None) with gradio's message."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class PageTimeout(PageError):
    """No answer came in time."""


PLAYER_SHOWS = {"pl-output": "output", "pl-status": "status", "pl-stats": "stats", "pl-outputs": "outputs_line"}


@dataclass
class Shown:
    """An animated frame that reached the page: its index in the stream and its webcam frame's capture time."""

    index: int
    captured: float | None
    arrived: float  # time.monotonic() in this process


def data_url(frame: np.ndarray, quality: int = 80) -> str:
    """uint8 (H, W, 3) -> a `data:image/jpeg;base64,...` URL, as the page sends webcam frames."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return as_data_url(buffer.getvalue(), "image/jpeg")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds one row: a decompression bomb's header, cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * width + 1)))
            + chunk(b"IEND", b""))


def jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "gray").save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def as_data_url(raw: bytes, mime: str = "image/png") -> str:
    """Encoded bytes (an image file) as a `data:<mime>;base64,...` URL."""
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def apply_diff(value: Any, edits: list) -> Any:
    """A value after gradio's generator diff (`["replace" | "append" | "add" | "delete", path, new]` edits)."""
    for op, path, new in edits:
        if not path:
            value = value + new if op == "append" else new
            continue
        target = value
        for key in path[:-1]:
            target = target[key]
        key = path[-1]
        if op == "delete":
            del target[key]
        elif op == "append":
            target[key] += new
        elif op == "add" and isinstance(target, list):
            target.insert(key, new)
        else:
            target[key] = new
    return value


def _text(value: Any) -> str | None:
    """A component's shown text from an output value: a string, or an update dict's `value` (None: unchanged)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return value["value"]
    return None


class PageClient:
    """One tab of the page at `url`. `open()` loads it; then `sample()`/`fuse(path)`, `send_frame(frame)`,
    `play(path)`, `stop()`, ...; `status`, `stats` and `shown` follow what the page shows; `close()` closes the
    tab, `crash()` drops its connections, `freeze()` stops talking without closing them (a network cut).

    Args:
        url: the server; session: the gradio session id (random, as the page's); timeout: s per HTTP call and per
        event answer.
    """

    def __init__(self, url: str, session: str | None = None, timeout: float = 120.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = session or "".join(random.choices(string.ascii_lowercase + string.digits, k=11))
        self.http = httpx.Client(base_url=self.url, timeout=timeout, limits=httpx.Limits(max_connections=8))
        self.fns: dict[str, int] = {}  # handler name -> fn_index
        self.triggers: dict[str, int | None] = {}  # handler name -> the component that triggers it
        self.status = self.stats = self.output = self.outputs_line = ""
        self.player_shows: list[str | None] = []  # the player's outputs: PageClient attribute of each (PLAYER_SHOWS)
        self.shown: list[Shown] = []
        self.sent = 0  # webcam frames sent
        self._cond = threading.Condition()
        self._done: dict[str, dict] = {}  # event id -> its process_completed message
        self._pending: set[str] = set()
        self._values: dict[str, list] = {}  # generator event -> raw output values (diffs apply to these)
        self._player: str | None = None
        self._webcam: str | None = None
        self._sse: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []  # of the long requests, cut from outside on close/crash
        self._messages_socket: socket.socket | None = None  # the newest queue-data stream's
        self._frozen = threading.Event()  # no more reading or sending
        self._gone = threading.Event()  # the connections are closed
        self._closed = False
        self._failed: PageError | None = None  # the page's message stream was refused: no answer will come

    # ------------------------------------------------------------------------------------------------ page life
    def open(self) -> PageClient:
        """Load the page: cookie and config, heartbeat, then the player (which opens the session)."""
        self.load()
        self._thread(self._heartbeat, "heartbeat")
        self._player = self.join("player", [])
        return self

    def load(self) -> PageClient:
        """Only the page's HTML (the guard's cookie comes with it) and its config (the handlers)."""
        self.http.get("/").raise_for_status()
        config = self.http.get("/config").raise_for_status().json()
        elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
        for dep in config["dependencies"]:
            name = dep.get("api_name")
            if name:
                self.fns[name] = dep["id"]
                self.triggers[name] = dep["targets"][0][0] if dep["targets"] else None
            if name == "player":  # its outputs by what they show, not by position (the page may add some)
                self.player_shows = [PLAYER_SHOWS.get(elem_ids.get(c)) for c in dep["outputs"]]
        return self

    def close(self) -> None:
        """Close the tab: the webcam stream ends, then the connections (the server runs the page's unload)."""
        if self._closed:
            return
        if self._webcam is not None:
            try:
                self.http.post(f"{API}/stream/{self._webcam}/close")
            except httpx.HTTPError:
                pass
        self._shutdown()

    def crash(self) -> None:
        """The tab crashes: every connection drops at once, nothing more is said."""
        self._shutdown()

    def freeze(self) -> None:
        """The network goes away silently: nothing more is sent or read, the connections stay open (until
        `release()`)."""
        self._frozen.set()

    def release(self) -> None:
        """Drop the connections of a frozen tab (the end of a test)."""
        self._shutdown()

    def cut_messages(self) -> None:
        """Cut the page's queue-data stream (a dropped connection): the client opens it again while events are
        pending, and gradio, which dropped the page's messages with the stream, refuses it (404)."""
        with self._cond:
            sock = self._messages_socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already

    def _shutdown(self) -> None:
        self._closed = True
        self._frozen.set()
        self._gone.set()
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the reading thread ends, the server sees the tab leave
            except OSError:
                pass  # closed already
        self.http.close()
        with self._cond:
            self._cond.notify_all()

    def _thread(self, target: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"{name}-{self.session}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _stream_lines(self, path: str) -> Iterator[str]:
        """The lines of a long GET (server-sent events) on a socket of its own, which `_shutdown` can cut while a
        thread reads it (httpx cannot close a connection in use).

        Raises:
            PageError: the server refused it (its status and detail).
        """
        url = httpx.URL(self.url)
        connection = http.client.HTTPConnection(url.host, url.port)
        cookie = "; ".join(f"{name}={value}" for name, value in self.http.cookies.items())
        connection.request("GET", path, headers={"Accept": "text/event-stream", "Cookie": cookie})
        with self._cond:
            self._sockets.append(connection.sock)
            if path.startswith(f"{API}/queue/data"):
                self._messages_socket = connection.sock
        try:
            response = connection.getresponse()
            if response.status != 200:
                raise PageError(_detail_of(response.status, response.read(2000)), response.status)
            while line := response.readline():
                yield line.decode("utf-8").rstrip("\r\n")
        finally:
            connection.close()

    def _heartbeat(self) -> None:
        try:
            for _ in self._stream_lines(f"{API}/heartbeat/{self.session}"):
                if self._frozen.is_set():
                    self._gone.wait()  # frozen: the connection stays open, unread
                    return
        except (OSError, http.client.HTTPException):
            pass  # the tab closed
        except PageError as e:
            logger.warning("page %s: heartbeat refused (%s)", self.session, e)

    # ---------------------------------------------------------------------------------------------------- events
    def join(self, name: str, data: list, event_data: Any = None) -> str:
        """Start handler `name` with `data`; returns its event id.

        Raises:
            PageError: the server refused the call (4xx).
        """
        body = {"data": data, "event_data": event_data, "fn_index": self.fns[name], "trigger_id": self.triggers[name],
                "session_hash": self.session}
        response = self.post_join(body)
        if response.status_code != 200:
            raise PageError(_detail(response), response.status_code)
        return response.json()["event_id"]

    def post_join(self, body: Any) -> httpx.Response:
        """POST any `body` to queue/join (a hostile test's, say); an event it starts for this page is read as the
        page's own (`result`)."""
        response = self.http.post(f"{API}/queue/join", json=body)
        if response.status_code == 200 and isinstance(body, dict) and body.get("session_hash") == self.session:
            with self._cond:
                self._pending.add(response.json()["event_id"])
                if self._sse is None and self._failed is None:
                    self._sse = self._thread(self._read_messages, "sse")
        return response

    def call(self, name: str, *data: Any) -> list:
        """Run handler `name` and wait for its outputs.

        Raises:
            PageError: refused (4xx), or the event ended with an error (its message).
        """
        return self.result(self.join(name, list(data)))

    def result(self, event: str, timeout: float | None = None) -> list:
        """The outputs of `event` once it completes.

        Raises:
            PageError: it ended with an error (the message), or no answer came within `timeout` s.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while event not in self._done:
                if self._failed is not None:
                    raise self._failed
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise PageTimeout(f"no answer within {self.timeout if timeout is None else timeout:.0f} s")
                self._cond.wait(min(left, 1.0))
            message = self._done.pop(event)
        if not message.get("success", False):
            output = message.get("output") or {}
            raise PageError(str(output.get("error") or message.get("title") or message.get("message") or message))
        return message["output"]["data"]

    def _read_messages(self) -> None:
        """The page's queue-data stream: every event's messages, until no event is pending. A stream the server
        refuses or ends because it has no message queue for this page (gradio's `session_not_found`) fails every
        pending `result` at once: polling again would never bring their answers."""
        while True:
            try:
                for line in self._stream_lines(f"{API}/queue/data?session_hash={self.session}"):
                    if self._frozen.is_set():
                        self._gone.wait()  # frozen: the connection stays open, unread
                        return
                    if line.startswith("data:"):
                        self._message(json.loads(line[5:]))
            except (OSError, http.client.HTTPException):
                pass  # the connection dropped: open it again while events are pending
            except PageError as e:
                self._fail(e)
            except Exception as e:  # a message this client cannot read: say so instead of waiting for nothing
                self._fail(PageError(f"page {self.session}: unreadable message from the server ({e!r})"))
            with self._cond:
                if self._closed or self._frozen.is_set() or not self._pending or self._failed is not None:
                    self._sse = None
                    return

    @property
    def failed(self) -> PageError | None:
        """Why the page's message stream was refused (then every pending and later call fails with it), or None."""
        return self._failed

    def _fail(self, error: PageError) -> None:
        logger.warning("page %s: the message stream failed: %s", self.session, error)
        with self._cond:
            self._failed = error
            self._cond.notify_all()

    def _message(self, message: dict) -> None:
        kind, event = message.get("msg"), message.get("event_id")
        if kind == "unexpected_error" and message.get("session_not_found"):
            raise PageError(f"HTTP 404: the server has no message queue for page {self.session}; reload the page",
                            404)
        if kind == "process_generating" and event == self._player:
            self._player_output(event, message["output"]["data"])
        elif kind == "process_completed" or (kind == "unexpected_error" and event):
            with self._cond:
                self._pending.discard(event)
                self._done[event] = message
                if len(self._done) > 1000:  # answers nobody waits for (webcam frames)
                    self._done.pop(next(iter(self._done)))
                self._cond.notify_all()

    def _player_output(self, event: str, data: list) -> None:
        raw = self._values.get(event)
        raw = self._values[event] = list(data) if raw is None else [apply_diff(v, d) for v, d in zip(raw, data, strict=True)]
        now = time.monotonic()
        shown = {name: text for name, text in zip(self.player_shows, (_text(v) for v in raw), strict=True)
                 if name is not None and text is not None}
        with self._cond:
            output = shown.pop("output", None)
            if output is not None and output != self.output:
                self.output = output
                if match := FRAME_HTML.search(output):
                    captured = float(match.group(2)) if match.group(2) else None
                    self.shown.append(Shown(int(match.group(1)), captured, now))
            for name, text in shown.items():
                setattr(self, name, text)
            self._cond.notify_all()

    def wait_for(self, condition: Any, timeout: float | None = None) -> bool:
        """Wait until `condition(self)` holds (checked whenever the page changes); False on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or self._failed is not None:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    # ----------------------------------------------------------------------------------------------- the page's UI
    def upload(self, path: str | Path) -> dict:
        """Upload a file as the page does; returns the FileData a handler takes."""
        path = Path(path)
        with path.open("rb") as f:
            response = self.http.post(f"{API}/upload", files={"files": (path.name, f)})
        if response.status_code != 200:
            raise PageError(_detail(response), response.status_code)
        return {"path": response.json()[0], "orig_name": path.name, "size": path.stat().st_size,
                "meta": {"_type": "gradio.FileData"}}

    def sample(self) -> str:
        return self.call("on_sample")[1]

    def fuse(self, path: str | Path) -> str:
        return self.call("on_fuse", self.upload(path))[1]

    def play(self, path: str | Path) -> str:
        return self.call("on_play", self.upload(path))[0]

    def start(self) -> str:
        return self.call("on_start")[0]

    def stop(self) -> str:
        return self.call("on_stop")[0]

    def reset(self) -> str:
        return self.call("on_reset")[0]

    def set_fps(self, fps: float) -> None:
        self.call("on_fps", fps)

    def set_seed(self, seed: int) -> None:
        self.call("on_seed", seed)

    def send_frame(self, frame: np.ndarray | str, captured: float | None = None) -> int:
        """One webcam frame (uint8 (H, W, 3), or a ready data URL) with its capture time; returns the HTTP status."""
        url = frame if isinstance(frame, str) else data_url(frame)
        value = {"url": url}
        data, event_data = [value, captured], {"value": value, "is_value_data": True}
        self.sent += 1
        if self._webcam is None:
            self._webcam = self.join("on_webcam", data, event_data)
            return 200
        body = {"fn_index": self.fns["on_webcam"], "data": data, "event_data": event_data,
                "session_hash": self.session}
        response = self.http.post(f"{API}/stream/{self._webcam}", json=body)
        if response.status_code == 404:  # the stream event ended (an error, a restart): the next frame joins anew
            self._webcam = None
        return response.status_code


def _detail(response: httpx.Response) -> str:
    return _detail_of(response.status_code, response.content)


def _detail_of(status: int, body: bytes) -> str:
    """`HTTP <status>: <detail>` from an error answer's body (the guard's and gradio's JSON `detail`, or its text)."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return f"HTTP {status}: {detail or body[:200].decode('utf-8', 'replace')}"
