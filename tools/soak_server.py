"""Reliability of the web server under load, churn, hostile requests, engine faults and oversized uploads, measured
through the page's own HTTP API (`personalive.server.client.PageClient`); JSON out, numbers in the README.

    python tools/soak_server.py --config configs/prompts/tiny.yaml --json soak.json        # everything, ~30 min
    python tools/soak_server.py --parts soak --frames 2000 --config configs/prompts/tiny.yaml

Parts (`--parts`, all by default):
- soak: one webcam stream of --frames driving frames (the sample clip, looped, at --fps): the server's resident
  memory, open files and threads over the run, and every frame accounted for (answered with its animated frame,
  left out by the driving FPS, dropped by the bounded queues, lost before the handler, or still in the engine);
- churn: --sessions pages, one after the other, each waiting in line while the previous streams; --killed of them
  vanish mid-stream (half crash: their connections drop; half freeze: a network cut, connections left open) instead
  of closing: how long the next page waits for the slot, and what is left afterwards (sessions, slots, engine state);
- hostile: --hostile malformed calls to every endpoint the page uses while another page streams: each call's answer
  (a clean 4xx or error message, never a 5xx, a traceback or silence), the streaming page's frame rate before,
  during and after, the server's memory;
- faults: --faults streams whose engine step raises (injected): the page shows the message, the slot frees, the next
  page streams and the server goes on;
- uploads: uploads over --max-upload-mb and images or videos whose header claims a huge size, refused before decoding.

The server runs in a child process built as `inference_online.py` builds it (plus a fault hook: a stream whose seed
is FAULT_SEED fails at its FAULT_STEP-th engine step), so the memory, files and threads measured are its own. Tests
run the same parts at a small scale against a server in their own process (tests/server/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from personalive.server.client import (
    PageClient,
    PageError,
    PageTimeout,
    as_data_url,
    data_url,
    jpeg_header,
    png_header,
)

logger = logging.getLogger("soak_server")

FAULT_SEED = 666_666  # a stream with this seed fails (tools only: the hook is installed by `inject_faults`)
FAULT_STEP = 3  # ... at its third engine step after fusing
STREAMING = ("**Starting**", "**Streaming**")


# ----------------------------------------------------------------------------------------------------------------
# The server side: fault hook, state, the server in a child process or in this one


class FaultyEngine:
    """Wraps an engine's `step` and `fuse_reference`: a stream whose seed is FAULT_SEED raises at step FAULT_STEP."""

    def __init__(self, engine: Any):
        self.engine, self.steps, self.seed = engine, 0, None
        self._step, self._fuse = engine.step, engine.fuse_reference
        engine.step, engine.fuse_reference = self.step, self.fuse_reference

    def fuse_reference(self, *args: Any, seed: int | None = None, **kwargs: Any) -> Any:
        self.steps, self.seed = 0, seed  # the worker passes the session's seed
        return self._fuse(*args, seed=seed, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.steps += 1
        if self.seed == FAULT_SEED and self.steps >= FAULT_STEP:
            raise RuntimeError("injected fault")
        return self._step(*args, **kwargs)


def inject_faults(server: Any) -> None:
    for worker in server.workers:
        FaultyEngine(worker.engine)


def server_state(server: Any) -> dict:
    """What the server holds: open sessions (with their frame counters), slots, and each engine's stream state."""
    sessions = [dict(key=s.key, received=s.received, limited=s.limited, rejected=s.rejected, pushed=s.inputs.pushed,
                     dropped=s.inputs.dropped, buffered=len(s.inputs), pacer_dropped=s.pacer.dropped, error=s.error,
                     streaming=s.worker is not None) for s in server.sessions()]
    workers = [dict(streaming=w.session is not None, engine_state=getattr(w.engine, "state", None) is not None)
               for w in server.workers]
    return dict(sessions=sessions, running=server.pool.running, waiting=server.pool.waiting, workers=workers)


def usage(pid: int) -> dict:
    process = psutil.Process(pid)
    cpu = process.cpu_times()
    return dict(rss_mb=process.memory_info().rss / 2**20, fds=process.num_fds(), threads=process.num_threads(),
                cpu_s=round(cpu.user + cpu.system, 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcess:
    """A server in this process (tests): `url`, `state()`, `usage()`, `close()`."""

    def __init__(self, server: Any, page: Any, url: str, max_upload_mb: float):
        self.server, self.page, self.url, self.max_upload_mb = server, page, url, max_upload_mb

    def state(self) -> dict:
        return server_state(self.server)

    def usage(self) -> dict:
        return usage(os.getpid())

    def close(self) -> None:
        self.page.close()
        self.server.shutdown()


def serve(server: Any, reference_size: tuple[int, int], max_upload_mb: float = 50, **launch_kwargs: Any) -> InProcess:
    """Launch the page for `server` (faults injected) on a free local port, in the background."""
    from personalive.server.app import launch

    inject_faults(server)
    port = free_port()
    page = launch(server, reference_size, port=port, max_upload_mb=max_upload_mb, block=False, quiet=True,
                  **launch_kwargs)
    return InProcess(server, page, f"http://127.0.0.1:{port}", max_upload_mb)


class Child:
    """The server in a child process (`--serve`), answering `state` on its stdin."""

    def __init__(self, config: str, overrides: list[str], max_upload_mb: float, log: Path):
        self.max_upload_mb = max_upload_mb
        port = free_port()
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--config", config, "--max-upload-mb", str(max_upload_mb),
             *overrides], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the server did not start (see {log})")
        self.url = f"http://127.0.0.1:{port}"
        self._lock = threading.Lock()

    def state(self) -> dict:
        with self._lock:
            self.proc.stdin.write("state\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def usage(self) -> dict:
        return usage(self.proc.pid)

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self._log.close()


def run_child(port: int, config: str, overrides: list[str], max_upload_mb: float) -> int:
    """`--serve`: the server of `inference_online.py` on `port`; `state` on stdin prints its state as JSON."""
    from personalive.config import load_config
    from personalive.server.app import launch
    from personalive.server.worker import build_server

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config, overrides)
    server = build_server(cfg)
    inject_faults(server)
    page = launch(server, (cfg.reference_image_height, cfg.reference_image_width), port=port,
                  max_upload_mb=max_upload_mb, block=False, quiet=True)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "state":
            print(json.dumps(server_state(server)), flush=True)
        elif line.strip() == "quit":
            break
    page.close()
    server.shutdown()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Pages


def driving_urls(frames: int | None = None) -> list[str]:
    """The sample driving clip's frames as the page sends them (JPEG data URLs), encoded once."""
    from personalive.io.samples import sample_driving_video
    from personalive.io.video import VideoReader

    with VideoReader(sample_driving_video()) as reader:
        return [data_url(frame) for _, frame in zip(range(frames or 10**9), reader, strict=False)]


class Webcam(threading.Thread):
    """Sends a page's webcam frames (cycling through `urls`) at `fps` until stopped or `limit` frames are sent;
    frame i carries capture time i, which comes back with its animated frame."""

    def __init__(self, client: PageClient, urls: list[str], fps: float, limit: int | None = None):
        super().__init__(name=f"webcam-{client.session}", daemon=True)
        self.client, self.urls, self.fps, self.limit = client, urls, fps, limit
        self.stopped = threading.Event()
        self.errors = 0
        self.sent_at: list[float] = []  # time.monotonic() frame i was sent

    def run(self) -> None:
        start, i = time.monotonic(), 0
        while not self.stopped.is_set() and (self.limit is None or i < self.limit):
            self.sent_at.append(time.monotonic())
            try:
                self.client.send_frame(self.urls[i % len(self.urls)], captured=float(i))
            except (httpx.HTTPError, PageError, RuntimeError):
                self.errors += 1
                if self.client._closed:
                    return
            i += 1
            self.stopped.wait(max(start + i / self.fps - time.monotonic(), 0.0))

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


def visitor(url: str, urls: list[str], fps: float, seed: int | None = None) -> tuple[PageClient, Webcam]:
    """A page that opens, takes the sample portrait and starts its webcam."""
    client = PageClient(url).open()
    if seed is not None:
        client.set_seed(seed)
    client.sample()
    client.set_fps(30)  # the page's maximum: the driving FPS leaves out none of the frames sent
    webcam = Webcam(client, urls, fps)
    webcam.start()
    return client, webcam


def streaming(client: PageClient) -> bool:
    return any(word in client.status for word in STREAMING)


def answered(client: PageClient) -> set[int]:
    return {int(s.captured) for s in client.shown if s.captured is not None}


def settle(client: PageClient, quiet: float = 3.0, timeout: float = 60.0) -> None:
    """Wait until no animated frame has arrived for `quiet` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        count = len(client.shown)
        time.sleep(quiet)
        if len(client.shown) == count:
            return


def wait_idle(harness: Any, timeout: float = 30.0) -> dict:
    """The server's state once no slot is held and every engine has let go of its stream (or at `timeout`)."""
    end = time.monotonic() + timeout
    while True:
        state = harness.state()
        idle = not state["running"] and not any(w["streaming"] or w["engine_state"] for w in state["workers"])
        if idle or time.monotonic() > end:
            return state
        time.sleep(0.25)


def rate(client: PageClient, seconds: float) -> float:
    """Animated frames per second reaching `client` over the next `seconds`."""
    before = len(client.shown)
    time.sleep(seconds)
    return (len(client.shown) - before) / seconds


def latencies(client: PageClient, webcam: Webcam, start: float, end: float) -> list[float]:
    """s from sending each webcam frame to its animated frame reaching `client`, of the frames that arrived between
    `start` and `end` (time.monotonic())."""
    return [s.arrived - webcam.sent_at[int(s.captured)] for s in client.shown
            if start <= s.arrived < end and s.captured is not None and int(s.captured) < len(webcam.sent_at)]


def percentiles(values: list[float]) -> dict:
    """n, p50 and p95 of `values` (s) in ms."""
    if len(values) < 2:
        return dict(n=len(values), p50_ms=None, p95_ms=None)
    cuts = statistics.quantiles(values, n=20)
    return dict(n=len(values), p50_ms=round(1000 * statistics.median(values)), p95_ms=round(1000 * cuts[18]))


# ----------------------------------------------------------------------------------------------------------------
# The parts


def soak(harness: Any, frames: int, fps: float = 20.0, samples: int = 40, warmup: float = 0.1) -> dict:
    """One webcam stream of `frames` frames: memory, files and threads over time; every frame accounted for."""
    urls = driving_urls()
    client = PageClient(harness.url).open()
    client.sample()
    client.set_fps(30)
    webcam = Webcam(client, urls, fps, limit=frames)
    start = time.monotonic()
    webcam.start()
    trace = []
    every = max(frames // samples, 1)
    while webcam.is_alive():
        webcam.join(0.5)
        if client.sent >= every * (len(trace) + 1) or not webcam.is_alive():
            trace.append(dict(sent=client.sent, shown=len(client.shown), seconds=round(time.monotonic() - start, 1),
                              **harness.usage()))
    settle(client)
    session = next(s for s in harness.state()["sessions"] if s["key"] == client.session)
    got = answered(client)
    lost = client.sent - session["received"]  # replaced in gradio's stream slot before the handler took it
    counted = session["limited"] + session["rejected"] + session["dropped"] + session["pacer_dropped"]
    in_engine = session["received"] - len(got) - counted  # entered the engine's window, not out when input stopped
    client.close()
    after = [t for t in trace if t["sent"] >= warmup * frames] or trace

    def flat(key: str) -> dict:
        """After warm-up: first and last sample, range, and the largest deviation from the first (% of it)."""
        base, values = after[0][key], [t[key] for t in after]
        return dict(after_warmup=round(base, 1), end=round(values[-1], 1), min=round(min(values), 1),
                    max=round(max(values), 1), growth_pct=round(100 * (values[-1] - base) / base, 2),
                    max_deviation_pct=round(100 * max(abs(v - base) for v in values) / base, 2))

    return dict(
        frames_sent=client.sent, seconds=round(time.monotonic() - start, 1), answered=len(got),
        left_out_by_driving_fps=session["limited"], dropped_by_input_buffer=session["dropped"],
        dropped_by_output_pacer=session["pacer_dropped"], rejected=session["rejected"],
        lost_before_handler=lost, in_engine_at_end=in_engine, webcam_errors=webcam.errors,
        output_fps=round(len(got) / max(trace[-1]["seconds"], 1e-6), 2), warmup_frames=after[0]["sent"],
        rss_mb=flat("rss_mb"), open_files=flat("fds"), threads=flat("threads"), trace=trace)


def churn(harness: Any, sessions: int, killed: int, frames_each: int = 8, fps: float = 20.0) -> dict:
    """`sessions` pages one after another, each waiting in line while the previous streams; `killed` of them crash
    or freeze instead of closing. Handover = from a page leaving to the next one holding the slot."""
    urls = driving_urls(60)
    chosen = set(np.linspace(1, sessions - 2, killed).round().astype(int).tolist()) if killed else set()
    kinds = {i: ("crash" if k % 2 == 0 else "freeze") for k, i in enumerate(sorted(chosen))}
    handover: dict[str, list[float]] = {"close": [], "crash": [], "freeze": []}
    frozen, failures = [], []
    client, webcam = visitor(harness.url, urls, fps)
    if not client.wait_for(lambda c: len(c.shown) >= frames_each):
        failures.append("page 0 got no frames")
    for i in range(sessions):
        nxt = visitor(harness.url, urls, fps) if i + 1 < sessions else None
        if nxt is not None and not nxt[0].wait_for(lambda c: "busy" in c.status or streaming(c), 30):
            failures.append(f"page {i + 1} was not told to wait")
        kind = kinds.get(i, "close")
        webcam.stop()
        left = time.monotonic()
        if kind == "close":
            client.close()
        elif kind == "crash":
            client.crash()
        else:
            client.freeze()
            frozen.append(client)
        if nxt is None:
            break
        client, webcam = nxt
        if client.wait_for(streaming, 60):
            handover[kind].append(time.monotonic() - left)
        else:
            failures.append(f"page {i + 1} never got the slot ({client.status!r})")
        if not client.wait_for(lambda c: len(c.shown) >= frames_each, 60):
            failures.append(f"page {i + 1} got no frames")
        if (i + 1) % 10 == 0:
            logger.info("churn: %d of %d pages done, %d failures", i + 1, sessions, len(failures))
    after_churn = wait_idle(harness)
    open_with_frozen = len(after_churn["sessions"])
    for page in frozen:
        page.release()
    time.sleep(2)
    after_release = wait_idle(harness)
    # the next visitor after all of it
    first_frame = time.monotonic()
    client, webcam = visitor(harness.url, urls, fps)
    got_slot = client.wait_for(streaming, 30)
    slot_s = time.monotonic() - first_frame
    got_frames = client.wait_for(lambda c: len(c.shown) >= frames_each, 60)
    frames_s = time.monotonic() - first_frame
    webcam.stop()
    client.close()
    final = wait_idle(harness)

    def summary(values: list[float]) -> dict:
        return dict(n=len(values), p50=round(statistics.median(values), 2) if values else None,
                    max=round(max(values), 2) if values else None)

    return dict(
        sessions=sessions, killed=killed, crashed=sum(k == "crash" for k in kinds.values()), frozen=len(frozen),
        handover_s={k: summary(v) for k, v in handover.items()}, failures=failures,
        after_churn=dict(open_sessions=open_with_frozen, running=after_churn["running"],
                         waiting=after_churn["waiting"], engines_holding_state=sum(
                             w["engine_state"] for w in after_churn["workers"])),
        after_frozen_released=dict(open_sessions=len(after_release["sessions"]), running=after_release["running"]),
        next_visitor=dict(slot_s=round(slot_s, 2) if got_slot else None,
                          first_frames_s=round(frames_s, 2) if got_frames else None),
        at_end=dict(open_sessions=len(final["sessions"]), running=final["running"], waiting=final["waiting"],
                    engines_holding_state=sum(w["engine_state"] for w in final["workers"])))


def hostile_calls(pages: list[PageClient], victim: PageClient, rng: random.Random) -> dict[str, list]:
    """Per endpoint the page uses, functions that make one malformed call and return its outcome. The calls come
    from `pages` in turn (a page may start only so many events at once)."""
    turn = iter(range(10**12))
    client = pages[0]
    api = "/gradio_api"
    good = as_data_url(jpeg_header(64, 48), "image/jpeg")
    truncated = good[: len(good) // 2]
    images = [truncated, as_data_url(os.urandom(300)), "data:text/plain;base64,aGVsbG8=", "data:image/png,notbase64",
              as_data_url(png_header(8000, 8000)), as_data_url(jpeg_header(60000, 60000), "image/jpeg"),
              as_data_url(png_header(1, 1)), as_data_url(png_header(1, 3000)), as_data_url(png_header(3000, 1)),
              data_url(np.zeros((1, 1, 3), np.uint8)), data_url(np.zeros((2000, 3, 3), np.uint8))]
    values = [None, "", "x" * 5000, -1, 0, 1e308, -1e308, True, [], {}, [1, 2], {"path": "/etc/passwd"},
              {"path": "../../../etc/passwd", "meta": {"_type": "gradio.FileData"}},
              {"path": "/proc/self/environ", "meta": {"_type": "gradio.FileData"}},
              {"url": "http://169.254.169.254/latest/meta-data/", "meta": {"_type": "gradio.FileData"}},
              {"url": rng.choice(images)}, {"path": None, "url": None}]
    fns = list(client.fns)

    def join(body: dict, session: str | None = None) -> str:
        page = pages[next(turn) % len(pages)]
        body = {"session_hash": page.session if session is None else session, **body}
        response = page.post_join(body)
        if response.status_code != 200:
            return _http(response)
        if body.get("session_hash") != page.session:
            return "accepted-other-session"  # the guard let a page act for another: a failure
        event, fn = response.json()["event_id"], body.get("fn_index")
        long = fn in (page.fns["on_webcam"], page.fns["player"])  # they run until the page ends them
        try:
            page.result(event, timeout=3 if long else 60)
            return "handled"
        except PageTimeout:
            if not long:
                return f"no-answer ({next((k for k, v in page.fns.items() if v == fn), fn)})"
            if fn == page.fns["on_webcam"]:
                page.http.post(f"{api}/stream/{event}/close")  # a webcam stream waits for frames: the page ends it
            return "handled"
        except PageError as e:
            return "error-event" if _one_clean_line(str(e)) else f"bad-error: {str(e)[:200]}"

    def bad_join() -> str:
        fn = rng.choice(fns)
        kind = rng.randrange(9)
        if kind == 0:
            return join({"data": rng.choice(["x", 5, None, {}]), "fn_index": client.fns[fn]})
        if kind == 1:
            return join({"data": [rng.choice(values) for _ in range(rng.randrange(5))], "fn_index": client.fns[fn]})
        if kind == 2:
            return join({"data": [], "fn_index": rng.choice([-1, 999, "a", None, 1.5])})
        if kind == 3:
            return join({"fn_index": client.fns[fn]})  # no data
        if kind == 4:
            return join({"data": [], "fn_index": client.fns[fn]}, session=victim.session)  # not theirs
        if kind == 5:
            return join({"data": [], "fn_index": client.fns[fn]},
                        session=rng.choice(["", "x" * 200, "../etc", "ü", "a b"]))
        if kind == 6:
            return join({"data": [{"url": rng.choice(images)}, rng.choice([None, "x", -1])],
                         "fn_index": client.fns["on_webcam"], "event_data": None})
        if kind == 7:
            return join({"data": [rng.choice(values)], "fn_index": client.fns[rng.choice(
                ["on_fuse", "on_play", "on_fps", "on_seed"])]})
        return join({"data": [], "fn_index": client.fns[rng.choice(["on_stop", "on_start", "on_reset", "player",
                                                                     "on_unload", "on_sample"])]})  # out of order

    def post(path: str, **kwargs: Any) -> str:
        return _http(client.http.post(path, **kwargs))

    def get(path: str, **kwargs: Any) -> str:
        return _http(client.http.get(path, **kwargs))

    def stream() -> str:
        event = rng.choice(["0" * 32, "not-an-event", rng.randbytes(16).hex(), victim._webcam or "x"])
        body = rng.choice([{"data": [{"url": rng.choice(images)}, 1.0], "fn_index": client.fns["on_webcam"],
                            "session_hash": client.session}, {"data": "x"}, {}, {"session_hash": victim.session}])
        return post(f"{api}/stream/{event}" + rng.choice(["", "/close"]), json=body)

    def upload() -> str:
        kind = rng.randrange(4)
        if kind == 0:
            return post(f"{api}/upload")
        if kind == 1:
            return post(f"{api}/upload", data={"files": "not a file"})
        if kind == 2:
            return post(f"{api}/upload", content=b"--xx\r\nContent-Disposition: form-data; name=\"files\"; filename="
                        b"\"a.png\"\r\n\r\n\x89PNG", headers={"content-type": "multipart/form-data; boundary=xx"})
        return post(f"{api}/upload", files={"files": ("bomb.png", png_header(30000, 30000))})

    def raw_json() -> str:
        nan = f'{{"data": [NaN], "fn_index": {client.fns["on_fps"]}, "session_hash": "{client.session}"}}'.encode()
        return post(f"{api}/queue/join", content=rng.choice([b"{", b"\xff\xfe", b"[1,2", b"null", b"1" * 10000, nan]),
                    headers={"content-type": "application/json"})

    return {
        "GET /": [lambda: get("/", params={"view": "x" * rng.randrange(2000)})],
        "GET /config": [lambda: get("/config", params={"x": "y"})],
        "POST /upload": [upload],
        "POST /queue/join": [bad_join, raw_json],
        "GET /queue/data": [lambda: get(f"{api}/queue/data", params={"session_hash": rng.choice(
            [victim.session, "x" * 100, "", "../.."])}, timeout=10)],
        "POST /stream/<event>": [stream],
        "GET /heartbeat/<session>": [lambda: get(f"{api}/heartbeat/{rng.choice([victim.session, 'x' * 100, '%2e%2e'])}",
                                                 timeout=10)],
        "GET /file=<path>": [lambda: get(f"{api}/file=" + rng.choice(["/etc/passwd", "../../etc/passwd",
                                                                      "/proc/self/environ", "x" * 300]))],
        "POST /cancel": [lambda: post(f"{api}/cancel", json=rng.choice([{}, {"session_hash": client.session,
                                                                            "fn_index": 0, "event_id": victim._player},
                                                                           {"session_hash": victim.session,
                                                                            "fn_index": 10, "event_id": "x"}, []]))],
    }


BAD_OUTCOMES = ("server-error", "no-answer", "bad-error", "accepted-other-session")  # the others are clean answers


def _http(response: httpx.Response) -> str:
    if response.status_code >= 500:
        return f"server-error {response.status_code}"
    if response.status_code >= 400:
        return f"refused {response.status_code}"
    return "handled"


def _one_clean_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message and len(message) < 400


def hostile(harness: Any, calls: int, fps: float = 20.0, seconds: float = 10.0, seed: int = 0,
            rounds: int = 5) -> dict:
    """`calls` malformed calls per endpoint while another page streams, in `rounds` bursts, each after a quiet
    window of `seconds` (a last one follows): the streaming page's frame rate in quiet and attacked windows side by
    side, so that a change of the machine's load over the run does not pass for the attack's doing."""
    urls = driving_urls(60)
    victim, webcam = visitor(harness.url, urls, fps)
    victim.wait_for(lambda c: len(c.shown) >= 8)
    rss_before = harness.usage()["rss_mb"]
    pages = [PageClient(harness.url).open() for _ in range(max(1, min(calls // 30, 40)))]
    rng = random.Random(seed)
    makers = hostile_calls(pages, victim, rng)
    outcomes: dict[str, dict[str, int]] = {endpoint: {} for endpoint in makers}
    examples: list[str] = []
    quiet, attacked = [], []
    quiet_latency, attacked_latency = [], []  # s, of the victim's frames that arrived in quiet or attacked windows
    rss_max, attack_s, server_cpu, client_cpu = rss_before, 0.0, 0.0, 0.0
    me = psutil.Process()
    for r in range(rounds + 1):
        start = time.monotonic()
        quiet.append(round(rate(victim, seconds), 2))
        quiet_latency += latencies(victim, webcam, start, time.monotonic())
        if r == rounds:
            break
        shown, start = len(victim.shown), time.monotonic()
        cpu_before, mine_before = harness.usage()["cpu_s"], sum(me.cpu_times()[:2])
        for endpoint, make in makers.items():
            for _ in range(calls // rounds + (r < calls % rounds)):
                outcome = _attempt(rng.choice(make), endpoint)
                outcomes[endpoint][outcome] = outcomes[endpoint].get(outcome, 0) + 1
                if outcome.startswith(BAD_OUTCOMES) and len(examples) < 20:
                    examples.append(f"{endpoint}: {outcome}")
            rss_max = max(rss_max, harness.usage()["rss_mb"])
        took = time.monotonic() - start
        attacked_latency += latencies(victim, webcam, start, start + took)
        attack_s += took
        server_cpu += harness.usage()["cpu_s"] - cpu_before
        client_cpu += sum(me.cpu_times()[:2]) - mine_before
        attacked.append(round((len(victim.shown) - shown) / took, 2))
    for page in pages:
        page.close()
    victim_ok = streaming(victim) and "Stopped" not in victim.status
    webcam.stop()
    victim.close()
    wait_idle(harness)
    bad = sum(n for counts in outcomes.values() for k, n in counts.items() if k.startswith(BAD_OUTCOMES))
    median_quiet, median_attacked = statistics.median(quiet), statistics.median(attacked)
    return dict(calls_per_endpoint=calls, endpoints=len(outcomes), calls=sum(sum(c.values()) for c in outcomes.values()),
                bad_answers=bad, examples=examples, outcomes=outcomes, attack_s=round(attack_s, 1),
                calls_per_s=round(sum(sum(c.values()) for c in outcomes.values()) / attack_s, 1),
                cpu_s_during_attacks=dict(server=round(server_cpu, 1), attacking_client=round(client_cpu, 1)),
                victim_fps=dict(quiet=quiet, attacked=attacked, median_quiet=median_quiet,
                                median_attacked=median_attacked,
                                attacked_over_quiet=round(median_attacked / median_quiet, 2) if median_quiet else None),
                victim_latency=dict(quiet=percentiles(quiet_latency), attacked=percentiles(attacked_latency)),
                victim_still_streaming=victim_ok, rss_mb=dict(before=round(rss_before, 1), max=round(rss_max, 1),
                                                              after=round(harness.usage()["rss_mb"], 1)))


def _attempt(call: Any, endpoint: str) -> str:
    """One hostile call's outcome; an HTTP failure is an outcome too."""
    try:
        return call()
    except httpx.TimeoutException:
        long = "data" in endpoint or "heartbeat" in endpoint
        return "timeout (a long request that stays open)" if long else "no-answer"
    except httpx.HTTPError as e:
        return f"no-answer {type(e).__name__}"


def faults(harness: Any, rounds: int, fps: float = 20.0) -> dict:
    """`rounds` times: a page whose stream fails (injected) while another waits in line."""
    urls = driving_urls(60)
    shown_message = freed = 0
    handover, failures = [], []
    for i in range(rounds):
        faulty, faulty_cam = visitor(harness.url, urls, fps, seed=FAULT_SEED)
        if not faulty.wait_for(streaming, 60):
            failures.append(f"round {i}: the faulty page never streamed")
        waiting, waiting_cam = visitor(harness.url, urls, fps)
        if faulty.wait_for(lambda c: "injected fault" in c.status, 60):
            shown_message += 1
            failed = time.monotonic()
            if waiting.wait_for(streaming, 30):
                freed += 1
                handover.append(time.monotonic() - failed)
            if not waiting.wait_for(lambda c: len(c.shown) >= 8, 60):
                failures.append(f"round {i}: the next page got no frames")
        else:
            failures.append(f"round {i}: no message on the faulty page ({faulty.status!r})")
        if i == 0:
            message = faulty.status
        for client, cam in ((faulty, faulty_cam), (waiting, waiting_cam)):
            cam.stop()
            client.close()
        wait_idle(harness)
    state = wait_idle(harness)
    return dict(rounds=rounds, message_on_page=shown_message, slot_freed=freed,
                handover_s=dict(p50=round(statistics.median(handover), 2) if handover else None,
                                max=round(max(handover), 2) if handover else None),
                first_message=message if rounds else None, failures=failures,
                at_end=dict(open_sessions=len(state["sessions"]), running=state["running"],
                            engines_holding_state=sum(w["engine_state"] for w in state["workers"])))


def uploads(harness: Any, folder: Path) -> dict:
    """Oversized uploads and decompression bombs: each refused with its reason, nothing decoded."""
    limit = int(harness.max_upload_mb * 2**20)
    client = PageClient(harness.url).open()
    rss_before = harness.usage()["rss_mb"]
    results = {}
    big = folder / "big.png"
    big.write_bytes(png_header(64, 64) + os.urandom(limit + 2**20))
    try:
        client.upload(big)
        results["over_max_upload"] = "accepted"
    except PageError as e:
        results["over_max_upload"] = f"refused ({e.status})"
    for name, raw in (("png_8000x8000", png_header(8000, 8000)), ("png_60000x60000", png_header(60000, 60000)),
                      ("jpeg_60000x60000", jpeg_header(60000, 60000))):
        path = folder / f"{name}.{name[:4].strip('_')}"
        path.write_bytes(raw)
        status = client.fuse(path)
        results[f"reference_{name}"] = status.split("\n")[0]
    for name, raw, mime in (("png_8000x8000", png_header(8000, 8000), "image/png"),
                            ("jpeg_60000x60000", jpeg_header(60000, 60000), "image/jpeg")):
        response = client.http.post("/gradio_api/queue/join", json={
            "data": [{"url": as_data_url(raw, mime)}, 1.0], "fn_index": client.fns["on_webcam"],
            "session_hash": client.session})
        results[f"webcam_frame_{name}"] = f"{response.status_code} {_detail(response)}"
    body = json.dumps({"data": [{"url": "data:image/jpeg;base64," + "A" * (9 * 2**20)}, 1.0],
                       "fn_index": client.fns["on_webcam"], "session_hash": client.session})
    response = client.http.post("/gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
    results["webcam_frame_9mb_body"] = f"{response.status_code} {_detail(response)}"
    client.close()
    refused = sum(("refused" in v or "limit" in v or "huge" in v or v.startswith("413")) for v in results.values())
    return dict(cases=len(results), refused=refused, results=results,
                rss_mb=dict(before=round(rss_before, 1), after=round(harness.usage()["rss_mb"], 1)))


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except (ValueError, AttributeError):
        return response.text[:200]


def log_summary(log: str) -> dict:
    """The server log's errors and tracebacks (records of the server's log format), the injected faults' apart."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log)
    bad = [r for r in records if re.search(r"^\S+ \S+ (?:ERROR|CRITICAL) ", r) or "Traceback" in r]
    injected = [r for r in bad if "RuntimeError: injected fault" in r]
    # gradio's wait_for_event_or_timeout leaves a task waiting for the stream's next frame; when the stream ends,
    # asyncio logs it as destroyed while pending (harmless: nothing was waiting on it)
    pending = [r for r in bad if "Task was destroyed but it is pending" in r and "Queue.wait_for_event()" in r]
    others = [" / ".join(line.strip()[:200] for line in (r.splitlines()[0], r.splitlines()[-1])) for r in bad
              if r not in injected and r not in pending]
    return dict(error_records=len(bad), of_injected_faults=len(injected), gradio_pending_stream_tasks=len(pending),
                others=len(others), examples=others[:10])


# ----------------------------------------------------------------------------------------------------------------

PARTS = ("soak", "churn", "hostile", "faults", "uploads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/prompts/tiny.yaml")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--frames", type=int, default=20_000, help="soak: driving frames of the stream")
    parser.add_argument("--fps", type=float, default=20.0, help="webcam frames per second each page sends")
    parser.add_argument("--sessions", type=int, default=200, help="churn: pages opened and closed")
    parser.add_argument("--killed", type=int, default=50, help="churn: pages that crash or freeze instead")
    parser.add_argument("--hostile", type=int, default=1000, help="hostile: malformed calls per endpoint")
    parser.add_argument("--faults", type=int, default=20, help="faults: streams whose engine step raises")
    parser.add_argument("--max-upload-mb", type=float, default=50)
    parser.add_argument("--json", type=Path, help="write the results here (default: stdout)")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here (default: summarised only)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.serve:
        return run_child(args.serve, args.config, args.overrides, args.max_upload_mb)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        parser.error(f"unknown parts {unknown}; use {', '.join(PARTS)}")
    with tempfile.TemporaryDirectory(prefix="soak_server.") as tmp:
        server_log = args.server_log or Path(tmp) / "server.log"
        harness = Child(args.config, args.overrides, args.max_upload_mb, server_log)
        results: dict[str, Any] = dict(config=args.config, overrides=args.overrides, cpu_count=os.cpu_count(),
                                       started=time.strftime("%Y-%m-%d %H:%M:%S"), server_at_start=harness.usage())
        try:
            jobs = dict(soak=lambda: soak(harness, args.frames, args.fps),
                        churn=lambda: churn(harness, args.sessions, args.killed, fps=args.fps),
                        hostile=lambda: hostile(harness, args.hostile, args.fps),
                        faults=lambda: faults(harness, args.faults, args.fps),
                        uploads=lambda: uploads(harness, Path(tmp)))
            for part in parts:
                logger.info("%s ...", part)
                start = time.monotonic()
                results[part] = jobs[part]()
                results[part]["wall_s"] = round(time.monotonic() - start, 1)
                logger.info("%s done in %.0f s", part, results[part]["wall_s"])
                if args.json:  # partial results survive an interrupted run
                    args.json.write_text(json.dumps(results, indent=2) + "\n")
            results["server_at_end"] = harness.usage()
            log = server_log.read_text()
            results["server_log"] = log_summary(log)
        finally:
            harness.close()
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
