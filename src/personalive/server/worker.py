"""The engines behind the web page: one worker thread per device, a pool of stream slots, and the session registry.

- `Worker` owns one `StreamEngine` on one device and runs it in its own thread for one session at a time. It is the
  only code that hands frames to an engine: it takes a chunk of CPU uint8 frames from the session's buffer, runs one
  step (at most one in flight) and gives CPU uint8 frames back. A new session or a new session epoch (new
  reference, Reset) re-fuses the reference with the session's seed first.
- `SlotPool` hands out the workers: at most one stream per worker, the rest wait in line (first come, first
  served); a waiter that stops asking (its page is gone) leaves the line after `stale_after` seconds.
- `StreamServer` keeps the sessions of all browser tabs and moves them in and out of slots as they start, stop,
  wait or close.
- `build_server` loads one engine per device (`--devices`) with the chosen acceleration backend.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from personalive.config import PersonaLiveConfig
from personalive.errors import ConfigError, PersonaLiveError, ServerBusyError, reason
from personalive.io.images import frames_to_tensor, to_uint8
from personalive.pipelines.build import build_engine, check_acceleration, resolve_device
from personalive.server.pacing import Stamp
from personalive.server.session import Session

logger = logging.getLogger(__name__)

FIRST_STATUS = "Upload a reference portrait and press **Fuse**, or press **Use sample**."


class Worker:
    """Runs one engine in its own thread for the session attached to it.

    Args:
        engine: a `StreamEngine` (or anything with `window`, `num_ramp_frames`, `fuse_reference(image, seed=)`,
            `step(frames (w, 3, H, W) in [-1, 1]) -> (w, H, W, 3) in [0, 1]` and `reset()`).
        name: the device name, for the page and the logs.
    """

    def __init__(self, engine: Any, name: str):
        self.engine, self.name = engine, name
        self._cond = threading.Condition()
        self._session: Session | None = None
        self._closed = False
        # (session, epoch) the engine holds; the session itself, not its id(), which a new session could reuse
        self._fused: tuple[Session, int] | None = None
        self._stamps: deque[Stamp] = deque()  # of the frames inside the engine's window
        self.step_times: deque[float] = deque(maxlen=1000)  # seconds per step, newest last
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def session(self) -> Session | None:
        return self._session

    def attach(self, session: Session) -> None:
        with self._cond:
            self._session = session
            self._cond.notify_all()

    def detach(self) -> None:
        with self._cond:
            self._session = None
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._session is not None, timeout=0.5)
                if self._closed:
                    return
                session = self._session
            if session is None:
                if self._fused is not None:
                    self._release_engine()  # the stream's state goes while idle
                continue
            epoch = session.epoch
            try:
                self._serve(session)
            except PersonaLiveError as e:
                logger.warning("stream of session %s stopped: %s", session.key[:8], e)
                session.fail(epoch, str(e))
                self._release_engine()
            except Exception as e:  # a bug: keep the server and the other streams running, log the traceback
                logger.exception("engine on %s failed", self.name)
                session.fail(epoch, f"The engine failed ({type(e).__name__}: {reason(e)}); see the server log.")
                self._release_engine()

    def _release_engine(self) -> None:
        """Forget the stream the engine held (a failed step may have left it half-updated)."""
        self._fused = None
        self._stamps.clear()
        try:
            self.engine.reset()
        except Exception:  # the worker thread must live on: its slot would be lost
            logger.exception("engine on %s failed to reset", self.name)

    def _serve(self, session: Session) -> None:
        """One round: (re-)fuse if the session restarted, then one step if a chunk of frames is ready."""
        engine, window = self.engine, self.engine.window
        epoch, reference, seed = session.stream_spec()
        if reference is None or session.error is not None:
            time.sleep(0.05)  # nothing to do until the session changes
            return
        if self._fused is None or self._fused[0] is not session or self._fused[1] != epoch:
            engine.fuse_reference(reference, seed=seed)  # the noise generator restarts from the session's seed
            self._fused = (session, epoch)
            self._stamps.clear()
            logger.info("session %s: reference fused on %s (seed %d)", session.key[:8], self.name, seed)
        chunk = session.inputs.take(window, timeout=0.1)
        if chunk is None or session.epoch != epoch or self._session is not session:
            return
        start = time.perf_counter()
        frames = engine.step(frames_to_tensor(chunk.frames))  # (w, H, W, 3) float32 in [0, 1], CPU
        step_time = time.perf_counter() - start
        self.step_times.append(step_time)
        # the engine returns the chunk given `num_ramp_frames` frames ago; the first steps return the ramp
        self._stamps.extend(chunk.stamps)
        if len(self._stamps) > engine.num_ramp_frames:
            stamps: list[Stamp | None] = [self._stamps.popleft() for _ in range(window)]
        else:
            stamps = [None] * window
        session.deliver(to_uint8(frames), stamps, epoch, step_time, time.monotonic())


class SlotPool:
    """At most one stream per slot; the others wait in line, first come first served. Thread-safe.

    Args:
        slots: the things handed out (workers).
        stale_after: a waiter that has not asked again for this many seconds leaves the line.
    """

    def __init__(self, slots: Sequence[Any], stale_after: float = 5.0):
        if not slots:
            raise ValueError("a slot pool needs at least one slot")
        self._free = list(slots)
        self.capacity = len(slots)
        self.stale_after = stale_after
        self._held: dict[str, Any] = {}
        self._line: dict[str, float] = {}  # waiter -> last time it asked (insertion order = line order)
        self._lock = threading.Lock()

    def acquire(self, key: str, now: float) -> Any | None:
        """The slot held by `key`, a free slot if `key` is first in line, else None (and `key` waits in line)."""
        with self._lock:
            if key in self._held:
                return self._held[key]
            for waiter, seen in list(self._line.items()):
                if now - seen > self.stale_after:
                    del self._line[waiter]
            self._line[key] = now  # joins the end of the line, or refreshes its place
            if self._free and next(iter(self._line)) == key:
                del self._line[key]
                self._held[key] = slot = self._free.pop(0)
                return slot
            return None

    def release(self, key: str) -> Any | None:
        """Give back the slot of `key` (and leave the line); returns the slot, if it held one."""
        with self._lock:
            self._line.pop(key, None)
            slot = self._held.pop(key, None)
            if slot is not None:
                self._free.append(slot)
            return slot

    def position(self, key: str) -> int | None:
        """1-based place of `key` in the line, or None if it is not waiting."""
        with self._lock:
            for i, waiter in enumerate(self._line, 1):
                if waiter == key:
                    return i
            return None

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._line)


class StreamServer:
    """The sessions of all browser tabs and the slots they stream in.

    Args:
        workers: one per device; height, width, window, fps, seed: session settings (from the config);
        idle_timeout: seconds without webcam frames that end a webcam stream;
        stale_after: seconds after which a session whose page stopped asking for frames is closed;
        max_sessions: open pages at most (each polls the server); more are told the server is full.
    """

    def __init__(self, workers: Sequence[Worker], height: int, width: int, window: int, fps: float, seed: int,
                 idle_timeout: float = 2.0, stale_after: float = 60.0, max_sessions: int = 64):
        self.workers = list(workers)
        self.pool = SlotPool(self.workers)
        self.settings = dict(height=height, width=width, window=window, fps=fps, seed=seed, idle_timeout=idle_timeout)
        self.stale_after = stale_after
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._closed: deque[str] = deque(maxlen=4096)  # recently closed tabs: late requests must not revive them
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def sessions(self) -> list[Session]:
        """The open sessions (a snapshot)."""
        with self._lock:
            return list(self._sessions.values())

    def get(self, key: str) -> Session | None:
        """The open session of browser session `key`, or None (never opened, or closed)."""
        with self._lock:
            return self._sessions.get(key)

    def session(self, key: str) -> Session:
        """The session of browser session `key` (created on first use; a closed one stays closed).

        Raises:
            ServerBusyError: `max_sessions` pages are open already.
        """
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                if len(self._sessions) >= self.max_sessions and key not in self._closed:
                    raise ServerBusyError(f"{self.max_sessions} pages are open already; try again later")
                session = Session(key, **self.settings)
                if key in self._closed:
                    session.closed = True  # a request that arrived after its tab closed
                else:
                    self._sessions[key] = session
                    logger.info("session %s opened (%d open)", key[:8], len(self._sessions))
            return session

    def close_session(self, key: str) -> None:
        """The browser tab closed: stop its stream and free its slot at once."""
        with self._lock:
            session = self._sessions.pop(key, None)
            self._closed.append(key)
        if session is not None:
            session.close()
            self._release(session)
            logger.info("session %s closed", key[:8])

    def update(self, session: Session, now: float) -> None:
        """Move `session` into a slot when it wants to stream and one is free, out of it when it stops."""
        session.last_seen = now
        self._sweep(now)
        if session.wants_stream(now):
            if session.worker is None:
                worker = self.pool.acquire(session.key, now)
                if worker is None:
                    session.waiting = (self.pool.position(session.key) or 0, self.pool.waiting)
                else:
                    session.waiting = None
                    session.worker = worker
                    worker.attach(session)
                    logger.info("session %s streams on %s", session.key[:8], worker.name)
        else:
            self._release(session)

    def _release(self, session: Session) -> None:
        session.waiting = None
        worker = session.worker
        self.pool.release(session.key)
        if worker is not None:
            session.worker = None
            if worker.session is session:
                worker.detach()
            logger.info("session %s left %s", session.key[:8], worker.name)

    def _sweep(self, now: float) -> None:
        with self._lock:
            stale = [key for key, s in self._sessions.items() if now - s.last_seen > self.stale_after]
        for key in stale:
            logger.info("session %s: its page stopped asking for frames", key[:8])
            self.close_session(key)

    def status(self, session: Session) -> str:
        """What the page's status line says (markdown)."""
        if session.error:
            return f"**Stopped:** {session.error}"
        if session.waiting is not None:
            position, waiting = session.waiting
            return (f"**Server busy**: {self.pool.running} of {self.capacity} streams running, {waiting} waiting "
                    f"(you are #{position}). Your animation starts by itself when a stream frees up.")
        if session.worker is not None:
            source = "the webcam" if session.source == "webcam" else "the driving video"
            if session.stats.frames == 0:
                state = f"**Starting** on {session.worker.name}: fusing the reference, first frames soon."
            else:
                state = f"**Streaming** {source} on {session.worker.name}."
        elif session.reference is None:
            state = FIRST_STATUS
        elif session.stopped:
            state = "**Stopped.** Press **Start** to animate the webcam again, or play a driving video."
        else:
            state = "**Ready.** Press **Record** in the webcam box, or play a driving video."
        notice = session.notice
        return f"**Note:** {notice}\n\n{state}" if notice else state

    def shutdown(self) -> None:
        with self._lock:
            keys = list(self._sessions)
        for key in keys:
            self.close_session(key)
        for worker in self.workers:
            worker.close()


# ----------------------------------------------------------------------------------------------------------------
def resolve_devices(names: Sequence[str]) -> list[torch.device]:
    """Device names -> devices, each usable and listed once ("cuda" is "cuda:<current>")."""
    devices: list[torch.device] = []
    for name in names:
        device = resolve_device(name.strip())
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device in devices:
            raise ConfigError(f"--devices lists {device} twice; one engine serves one device")
        devices.append(device)
    return devices


def build_server(cfg: PersonaLiveConfig, devices: Sequence[str] | None = None, acceleration: str = "none",
                 max_streams: int | None = None, **server_kwargs: Any) -> StreamServer:
    """Load one engine per device and start its worker.

    Args:
        cfg: the run config; devices: e.g. ["cuda:0", "cuda:1"] (default: [cfg.device]);
        acceleration: none | xformers | tensorrt | onnxruntime;
        max_streams: streams at once (default and maximum: one per device).
    """
    resolved = resolve_devices(devices or [cfg.device])
    for device in resolved:
        check_acceleration(acceleration, device)  # fails before any model loads
    streams = len(resolved) if max_streams is None else max_streams
    if streams < 1:
        raise ConfigError(f"--max-streams {streams}: must be at least 1")
    if streams > len(resolved):
        raise ConfigError(f"--max-streams {streams} with {len(resolved)} device(s): one engine serves one stream at a "
                          f"time; list {streams} devices, e.g. --devices cuda:0,cuda:1")
    if streams < len(resolved):
        logger.warning("--max-streams %d: only %s will be used", streams, ", ".join(map(str, resolved[:streams])))
        resolved = resolved[:streams]
    workers = []
    for device in resolved:
        engine = build_engine(cfg, device, acceleration)
        workers.append(Worker(engine, str(device)))
        logger.info("engine ready on %s (%s, acceleration %s)", device, engine.dtype, acceleration)
    return StreamServer(workers, cfg.height, cfg.width, cfg.temporal_window_size, cfg.fps, cfg.seed, **server_kwargs)
