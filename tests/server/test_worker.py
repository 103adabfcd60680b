"""Engine workers, the slot pool and the session registry: first-come-first-served slots with a waiting line,
re-fusing on restarts, stamps matched to the engine's delay, failures that stop one stream but not the server, a
flood of frames against the real tiny engine (latency stays bounded), and start-up errors of `build_server`."""

import base64
import io
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from personalive.errors import BackendUnavailableError, ConfigError, NoFaceError, ServerBusyError
from personalive.pipelines.stream import StreamEngine
from personalive.server.pacing import Stamp
from personalive.server.session import Session
from personalive.server.worker import SlotPool, StreamServer, Worker, build_server

H = W = 16


class FakeEngine:
    """The engine interface the worker uses; a step returns its input frames (mapped to [0, 1])."""

    window, num_ramp_frames = 4, 12

    def __init__(self, step_time: float = 0.0, fail_on_fuse: Exception | None = None):
        self.step_time, self.fail_on_fuse = step_time, fail_on_fuse
        self.fused: list[tuple[Image.Image, int]] = []
        self.steps = 0
        self.resets = 0

    def fuse_reference(self, image, seed=None):
        if self.fail_on_fuse is not None:
            raise self.fail_on_fuse
        self.fused.append((image, seed))

    def step(self, frames: torch.Tensor) -> torch.Tensor:
        assert frames.shape == (4, 3, H, W) and frames.dtype == torch.float32
        time.sleep(self.step_time)
        self.steps += 1
        return (frames.permute(0, 2, 3, 1) + 1) / 2

    def reset(self):
        self.resets += 1


def wait_until(condition, timeout: float = 20.0, poll: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(poll)
    return False


@pytest.fixture
def workers(request):
    made = []

    def make(*engines):
        made.extend(Worker(engine, f"fake:{i}") for i, engine in enumerate(engines))
        return made[-len(engines):]

    yield make
    for worker in made:
        worker.close()


def new_server(workers, **kwargs) -> StreamServer:
    return StreamServer(workers, H, W, window=4, fps=30, seed=5, **kwargs)


def stream_webcam(server: StreamServer, session: Session, frames: int, fps: float = 30.0) -> None:
    """Push `frames` webcam frames at `fps` (real time), keeping the session's slot bookkeeping going; frame i is
    grey level 5 * i % 256, captured by the page at 1000 + i ms."""
    for i in range(frames):
        now = time.monotonic()
        session.push_webcam(np.full((H, W, 3), 5 * i % 256, np.uint8), now, captured=1000.0 + i)
        server.update(session, now)
        time.sleep(1 / fps)


# ------------------------------------------------------------------------------------------------------- SlotPool
def test_slot_pool_first_come_first_served():
    pool = SlotPool(["gpu0"])
    assert pool.acquire("a", 0.0) == "gpu0"
    assert pool.acquire("a", 0.1) == "gpu0"  # asking again keeps it
    assert pool.acquire("b", 0.1) is None and pool.acquire("c", 0.2) is None
    assert (pool.running, pool.waiting, pool.position("b"), pool.position("c")) == (1, 2, 1, 2)
    assert pool.release("a") == "gpu0"
    assert pool.acquire("c", 0.3) is None  # not first in line
    assert pool.acquire("b", 0.3) == "gpu0"
    assert pool.position("b") is None and pool.position("c") == 1
    assert pool.release("nobody") is None


def test_slot_pool_drops_waiters_that_stopped_asking():
    pool = SlotPool(["gpu0"], stale_after=5.0)
    pool.acquire("a", 0.0)
    pool.acquire("b", 0.0)  # b's page goes away and never asks again
    pool.acquire("c", 0.0)
    pool.release("a")
    assert pool.acquire("c", 2.0) is None  # b is still in line
    assert pool.acquire("c", 6.0) == "gpu0"  # b is stale now
    assert pool.waiting == 0


def test_slot_pool_with_two_slots():
    pool = SlotPool(["gpu0", "gpu1"])
    assert {pool.acquire("a", 0), pool.acquire("b", 0)} == {"gpu0", "gpu1"}
    assert pool.acquire("c", 0) is None
    pool.release("b")
    assert pool.acquire("c", 1) is not None
    with pytest.raises(ValueError):
        SlotPool([])


# --------------------------------------------------------------------------------------------- Worker and server
class Player(threading.Thread):
    """What the page does: take each paced frame as it becomes due."""

    def __init__(self, session: Session):
        super().__init__(daemon=True)
        self.session, self.outputs, self.stop = session, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            if (out := self.session.next_output(time.monotonic())) is not None:
                self.outputs.append(out)
            time.sleep(0.002)


def test_worker_streams_a_session_and_matches_stamps_to_the_engine_delay(workers):
    engine = FakeEngine()
    server = new_server(workers(engine))
    session = server.session("tab-1")
    session.set_reference(Image.new("RGB", (H, W)))
    assert "Ready" in server.status(session)
    player = Player(session)
    player.start()
    stream_webcam(server, session, frames=30)
    assert wait_until(lambda: len(player.outputs) >= 16)
    player.stop.set()
    assert engine.fused == [(session.reference, 5)]  # fused once, with the session's seed
    stamps = [o.stamp for o in player.outputs]
    assert stamps[:12] == [None] * 12  # the first 3 steps return the ramp
    assert all(isinstance(t, Stamp) and t.captured is not None for t in stamps[12:16])
    assert session.stats.latency() is not None
    assert "Streaming" in server.status(session)


class DelayEngine(FakeEngine):
    """Returns the chunk it was given `num_ramp_frames` frames earlier (black ramp frames first), as the engine does."""

    def __init__(self):
        super().__init__()
        self.window_frames = deque()

    def step(self, frames: torch.Tensor) -> torch.Tensor:
        self.window_frames.extend(super().step(frames))
        if len(self.window_frames) <= self.num_ramp_frames:
            return torch.zeros(self.window, H, W, 3)
        return torch.stack([self.window_frames.popleft() for _ in range(self.window)])


def test_each_animated_frame_carries_the_capture_time_of_its_own_driving_frame(workers):
    server = new_server(workers(DelayEngine()))
    session = server.session("tab-1")
    session.set_reference(Image.new("RGB", (H, W)))
    player = Player(session)
    player.start()
    stream_webcam(server, session, frames=40)  # grey level 5 * i, captured at 1000 + i ms
    assert wait_until(lambda: len(player.outputs) >= 20)
    player.stop.set()
    animated = [o for o in player.outputs if o.stamp is not None]
    assert len(animated) >= 8
    for out in animated:
        grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(out.jpeg)))).mean()
        # the frame's own capture time, through the engine's delay (JPEG may be a level off)
        assert abs(grey - 5 * (out.stamp.captured - 1000)) < 2, (grey, out.stamp)
        assert out.stamp.arrived <= time.monotonic()


def test_worker_refuses_on_a_new_reference_or_reset_with_the_new_seed(workers):
    engine = FakeEngine()
    server = new_server(workers(engine))
    session = server.session("tab-1")
    session.set_reference(Image.new("RGB", (H, W)))
    stream_webcam(server, session, frames=10)
    assert wait_until(lambda: len(engine.fused) == 1)
    other = Image.new("RGB", (H, W), "white")
    session.set_reference(other)
    stream_webcam(server, session, frames=10)
    assert wait_until(lambda: len(engine.fused) == 2) and engine.fused[1] == (other, 5)
    session.set_seed(11)
    session.restart()
    stream_webcam(server, session, frames=10)
    assert wait_until(lambda: len(engine.fused) == 3) and engine.fused[2] == (other, 11)


def test_busy_server_queues_the_second_session_and_frees_the_slot_on_close(workers):
    engine = FakeEngine(step_time=0.01)
    server = new_server(workers(engine))
    first, second = server.session("tab-1"), server.session("tab-2")
    for s in (first, second):
        s.set_reference(Image.new("RGB", (H, W)))
    stream_webcam(server, first, frames=3)
    stream_webcam(server, second, frames=3)
    assert first.worker is not None and second.worker is None
    status = server.status(second)
    assert "busy" in status and "1 waiting" in status and "#1" in status
    server.close_session("tab-1")  # the first tab closes
    assert first.closed and server.workers[0].session is None
    stream_webcam(server, second, frames=3)
    assert second.worker is server.workers[0] and "busy" not in server.status(second)
    assert server.session("tab-1").closed  # a late request from the closed tab does not revive it


def test_stopping_releases_the_slot_and_an_idle_webcam_too(workers):
    engine = FakeEngine()
    server = new_server(workers(engine), idle_timeout=0.3)
    session = server.session("tab-1")
    session.set_reference(Image.new("RGB", (H, W)))
    stream_webcam(server, session, frames=3)
    assert session.worker is not None
    session.stop()
    server.update(session, time.monotonic())
    assert session.worker is None and "Stopped" in server.status(session)
    session.start()
    stream_webcam(server, session, frames=3)
    assert session.worker is not None
    time.sleep(0.4)  # the webcam stops sending
    server.update(session, time.monotonic())
    assert session.worker is None


def test_a_failing_stream_stops_alone_and_the_server_goes_on(workers):
    bad, good = FakeEngine(fail_on_fuse=NoFaceError("no face found in the reference")), FakeEngine()
    server = new_server(workers(bad, good))
    first, second = server.session("tab-1"), server.session("tab-2")
    for s in (first, second):
        s.set_reference(Image.new("RGB", (H, W)))
    stream_webcam(server, first, frames=3)  # takes the first worker, whose engine refuses the reference
    assert wait_until(lambda: first.error is not None)
    server.update(first, time.monotonic())
    assert first.worker is None and "no face" in server.status(first)
    assert bad.fused == [] and server.workers[0]._thread.is_alive()
    stream_webcam(server, second, frames=12)
    assert second.worker is server.workers[1] and second.error is None
    assert wait_until(lambda: good.steps >= 2)


def test_an_engine_bug_is_logged_and_reported(workers, caplog):
    class Broken(FakeEngine):
        failures = [RuntimeError("boom")]  # the first step fails, the next ones work

        def step(self, frames):
            if self.failures:
                raise self.failures.pop()
            return super().step(frames)

    engine = Broken()
    server = new_server(workers(engine))
    session = server.session("tab-1")
    session.set_reference(Image.new("RGB", (H, W)))
    stream_webcam(server, session, frames=6)
    assert wait_until(lambda: session.error is not None)
    assert "RuntimeError: boom" in session.error and "engine on fake:0 failed" in caplog.text
    worker = server.workers[0]
    assert worker._thread.is_alive()
    # the engine lets go of the failed stream at once (a half-updated state is never stepped again)
    assert wait_until(lambda: engine.resets >= 1) and worker._fused is None and not worker._stamps
    server.update(session, time.monotonic())
    assert session.worker is None and server.pool.running == 0 and "boom" in server.status(session)
    other = server.session("tab-2")  # the next visitor streams on the same engine
    other.set_reference(Image.new("RGB", (H, W), "white"))
    stream_webcam(server, other, frames=12)
    assert other.worker is worker and wait_until(lambda: engine.steps >= 2) and other.error is None
    assert engine.fused[-1][0] is other.reference


def test_open_pages_are_capped_and_a_closed_page_makes_room(workers):
    server = new_server(workers(FakeEngine()), max_sessions=2)
    a, b = server.session("a"), server.session("b")
    with pytest.raises(ServerBusyError, match="^2 pages are open already; try again later$"):
        server.session("c")
    assert server.get("c") is None and server.session("a") is a and server.get("b") is b
    server.close_session("a")
    assert server.get("a") is None and server.session("a").closed  # a closed tab stays closed and takes no room
    assert not server.session("c").closed and [s.key for s in server.sessions()] == ["b", "c"]


def test_stale_sessions_are_closed(workers):
    server = new_server(workers(FakeEngine()), stale_after=1.0)
    session = server.session("tab-1")
    server.update(session, now=100.0)
    other = server.session("tab-2")
    server.update(other, now=102.0)  # tab-1's page has not asked for frames for 2 s
    assert session.closed and not other.closed


# ------------------------------------------------------------------------------------------ the real tiny engine
def test_flooded_stream_keeps_latency_bounded(tiny_models, tiny_cfg):
    """Frames far faster than the engine: the input queue never grows, drops are counted, and each frame's latency
    stays within a few engine steps (measured on this machine, so a slow or busy CPU cannot fail it)."""
    engine = StreamEngine(tiny_models, tiny_cfg)  # the session's seed is an argument: the shared config stays
    worker = Worker(engine, "cpu")
    server = StreamServer([worker], tiny_cfg.height, tiny_cfg.width, engine.window, fps=1000, seed=1)
    session = server.session("flood")
    session.set_reference(Image.new("RGB", (64, 64), "gray"))
    sizes, latencies, stop = [], [], threading.Event()

    def show():  # the page's player
        while not stop.is_set():
            now = time.monotonic()
            if (out := session.next_output(now)) is not None and out.stamp is not None:
                latencies.append(now - out.stamp.arrived)
            sizes.append((len(session.inputs), len(session.pacer)))
            time.sleep(0.002)

    player = threading.Thread(target=show)
    player.start()
    rng = np.random.default_rng(0)
    try:
        deadline = time.monotonic() + 120
        while len(worker.step_times) < 9 and time.monotonic() < deadline:  # 200 frames/s
            now = time.monotonic()
            session.push_webcam(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), now)
            server.update(session, now)
            time.sleep(0.005)
    finally:
        stop.set()
        player.join()
        server.shutdown()
    assert len(worker.step_times) >= 9, "the engine did not run"
    assert engine.cfg is tiny_cfg and tiny_cfg.seed != 1
    assert max(n for n, _ in sizes) <= session.inputs.capacity
    assert max(m for _, m in sizes) <= session.pacer.max_frames
    assert session.inputs.dropped > 0.5 * session.inputs.pushed  # most frames were dropped, not queued
    assert latencies
    # a frame waits at most one step in the buffer, 3 more in the window, its own step, then pacing (~2 steps)
    bound = 8 * max(worker.step_times) + 2.0
    assert max(latencies) < bound, (max(latencies), list(worker.step_times))


# ----------------------------------------------------------------------------------------------- build_server
def test_build_server_fails_before_loading_anything(tiny_cfg):
    with pytest.raises(ConfigError, match="--max-streams 2 with 1 device"):
        build_server(tiny_cfg, ["cpu"], max_streams=2)
    with pytest.raises(ConfigError, match="twice"):
        build_server(tiny_cfg, ["cpu", "cpu"])
    with pytest.raises(ConfigError, match="unknown"):
        build_server(tiny_cfg, ["cpu"], acceleration="turbo")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            build_server(tiny_cfg, ["cuda:0"])
        with pytest.raises(BackendUnavailableError, match="xformers"):
            build_server(tiny_cfg, ["cpu"], acceleration="xformers")


def test_build_server_loads_one_engine_per_device(tiny_cfg, monkeypatch):
    calls = []

    def create_step_fn(acceleration, engine, cfg):  # stands in for the export runtime (tests/export run the real one)
        calls.append((acceleration, engine, cfg))
        return None

    monkeypatch.setattr("personalive.pipelines.build.exported_step_factory", lambda acceleration: create_step_fn)
    server = build_server(tiny_cfg, ["cpu"], acceleration="onnxruntime")
    try:
        assert server.capacity == 1 and server.workers[0].name == "cpu"
        engine = server.workers[0].engine
        assert calls == [("onnxruntime", engine, engine.cfg)]  # the backend is set up once per engine
    finally:
        server.shutdown()


def test_two_devices_serve_two_streams_at_once(tiny_cfg, monkeypatch):
    """`--devices cpu,cpu:1` (torch takes any CPU index, so this runs without GPUs): one engine per device with its
    own models, loaded once per device, and two tabs streaming at the same time, each on its own engine."""
    import personalive.pipelines.build as build

    loads, load_models = [], build.load_models
    monkeypatch.setattr(build, "load_models", lambda cfg, device, dtype: loads.append(str(device)) or load_models(
        cfg, device, dtype))
    server = build_server(tiny_cfg, ["cpu", "cpu:1"])
    try:
        assert loads == ["cpu", "cpu:1"] and [w.name for w in server.workers] == loads
        engines = [w.engine for w in server.workers]
        assert engines[0].models is not engines[1].models and server.capacity == 2
        tabs = [server.session(f"tab-{i}") for i in range(2)]
        for tab in tabs:
            tab.set_reference(Image.new("RGB", (64, 64), "gray"))
        deadline = time.monotonic() + 120
        while min(len(w.step_times) for w in server.workers) < 2 and time.monotonic() < deadline:
            for tab in tabs:
                now = time.monotonic()
                tab.push_webcam(np.zeros((64, 64, 3), np.uint8), now)
                server.update(tab, now)
            time.sleep(1 / 30)
        assert [tab.worker for tab in tabs] == server.workers  # both streams hold a device at once, none waits
        assert all(len(w.step_times) >= 2 for w in server.workers) and not any(tab.waiting for tab in tabs)
        assert loads == ["cpu", "cpu:1"]  # streaming loads nothing more
    finally:
        server.shutdown()


def test_cli_reports_bad_flags_in_one_line(tiny_weights, caplog):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("inference_online", ROOT / "inference_online.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--config", "configs/prompts/tiny.yaml", f"weights_dir={tiny_weights}", "--devices", "cpu",
            "--max-streams", "3"]
    assert module.main(argv) == 2
    assert "--max-streams 3 with 1 device" in caplog.text
