"""systemd integration: the notification protocol over a real datagram socket, the worker watch,
a real daemon reporting READY / STATUS / WATCHDOG / STOPPING to a socket standing in for
systemd's, and a worker that dies stopping the daemon's supervision."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from livelm.daemon.engine.engine import Engine
from livelm.daemon.http.server import build_app
from livelm.daemon.service_notify import ServiceNotifier
from livelm.daemon.supervision import STALL_LOG_S, Verdict, WorkerWatch, supervise, watch_for
from livelm.protocol.errors import Overloaded
from livelm.protocol.messages import InitRequest
from tests.daemon_process import start_daemon
from tests.engine_harness import loaded, run_engine
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where systemd's would be (short path: AF_UNIX allows 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="lvn-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10.0)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def receive(sock: socket.socket) -> dict[str, str]:
    fields = sock.recv(4096).decode().split("\n")
    return dict(field.split("=", 1) for field in fields)


def waiting(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram already waiting on ``sock``, without blocking for more."""
    sock.settimeout(0.0)
    messages = []
    while True:
        try:
            messages.append(receive(sock))
        except BlockingIOError:  # nothing more is waiting
            return messages


def test_notifier_sends_state_lines(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = ServiceNotifier.from_environ(env, os.getpid())
    assert notifier.enabled and notifier.watchdog_seconds == 2.0
    notifier.status("loading demo")
    notifier.ready("serving demo\non two lines")
    notifier.watchdog()
    notifier.stopping("draining")
    assert receive(sock) == {"STATUS": "loading demo"}
    assert receive(sock) == {"READY": "1", "STATUS": "serving demo on two lines"}
    assert receive(sock) == {"WATCHDOG": "1"}
    assert receive(sock) == {"STOPPING": "1", "STATUS": "draining"}


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"livelm-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10.0)
        ServiceNotifier.from_environ({"NOTIFY_SOCKET": "@" + name}, os.getpid()).ready("up")
        assert receive(sock) == {"READY": "1", "STATUS": "up"}


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({"WATCHDOG_USEC": "500000"}, 0.5),  # no WATCHDOG_PID: the watchdog is ours
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({}, None),
    ],
)
def test_watchdog_settings(env: dict[str, str], seconds: float | None) -> None:
    notifier = ServiceNotifier.from_environ({"NOTIFY_SOCKET": "/nonexistent", **env}, os.getpid())
    assert notifier.watchdog_seconds == seconds


def test_without_systemd_nothing_is_sent() -> None:
    notifier = ServiceNotifier.from_environ({"WATCHDOG_USEC": "500000"}, os.getpid())
    assert not notifier.enabled and notifier.watchdog_seconds is None
    notifier.ready("serving")  # no socket: nothing to do, nothing raised


def test_a_vanished_socket_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    notifier = ServiceNotifier("/nonexistent/livelm-notify")
    with caplog.at_level(logging.WARNING, logger="livelm.service"):
        notifier.watchdog()
        notifier.watchdog()
    warnings = [r for r in caplog.records if "cannot notify" in r.getMessage()]
    assert len(warnings) == 1


def test_worker_watch_verdicts(caplog: pytest.LogCaptureFixture) -> None:
    watch = WorkerWatch(stall_after=5.0)
    with caplog.at_level(logging.WARNING, logger="livelm.supervision"):
        assert watch.check(False, 0.1) is Verdict.HEALTHY
        assert watch.check(False, 6.0) is Verdict.STALLED
        assert watch.check(False, 7.0) is Verdict.STALLED
        assert watch.check(False, 0.2) is Verdict.HEALTHY
        assert watch.check(True, 0.0) is Verdict.FAILED
    messages = [r.getMessage() for r in caplog.records]
    assert sum("in one step" in m for m in messages) == 1  # logged when the stall starts
    assert sum("turning over again" in m for m in messages) == 1


def test_watch_interval_follows_the_watchdog() -> None:
    watch, interval = watch_for(ServiceNotifier("/x", watchdog_usec=60_000_000))
    assert (watch.stall_after, interval) == (30.0, 1.0)
    watch, interval = watch_for(ServiceNotifier("/x", watchdog_usec=400_000))
    assert (watch.stall_after, interval) == (0.2, 0.1)
    watch, _ = watch_for(ServiceNotifier(None))
    assert watch.stall_after == STALL_LOG_S


def test_daemon_tells_systemd_its_state(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}  # a ping at least every 0.1 s
    args = ["--model", "demo", "--cache-dir", str(tmp_path), "--log-format", "text"]
    with start_daemon(args, env=env, log_dir=tmp_path) as daemon:
        first = receive(sock)
        assert first == {"STATUS": "loading demo"}, daemon.log_text()
        ready = receive(sock)  # start_daemon returned: /ready is 200, so READY=1 was sent
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("serving demo on http://127.0.0.1:")
        assert f":{daemon.port}" in ready["STATUS"] and f":{daemon.tcp_port}" in ready["STATUS"]
        pings = [receive(sock) for _ in range(3)]
        assert pings == [{"WATCHDOG": "1"}] * 3
        code = daemon.stop()
    assert code == 0
    rest = waiting(sock)
    assert {"STOPPING": "1", "STATUS": "draining"} in rest
    assert rest[-1] == {"STOPPING": "1", "STATUS": "draining"}  # no pings after the drain began


async def _ready_reply(engine: Engine) -> tuple[int, dict]:
    """GET /ready from the daemon's own HTTP application, served on loopback over ``engine``."""
    runner = web.AppRunner(build_app(engine, engine.config, model="tiny"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{port}/ready") as reply:
                return reply.status, await reply.json()
    finally:
        await runner.cleanup()


def _kill_thread(thread_id: int) -> None:
    """Raises SystemExit inside the thread at its next Python instruction: a real worker, dying
    of an exception no step handler expects."""
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(SystemExit)
    )
    assert hit == 1


def test_a_dead_worker_stops_supervision(
    listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = listener
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "llama", seed=3)
    model = loaded(folder, tmp_path)
    notifier = ServiceNotifier(path, watchdog_usec=400_000)

    async def scenario(engine: Engine) -> tuple[bool, bool]:
        sid = (await engine.init_session(InitRequest(prompt="feed", template="raw"))).session_id
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(supervise(engine, notifier, stop))
        await asyncio.sleep(0.3)
        healthy = not stop.is_set() and not engine.worker_failed
        assert await _ready_reply(engine) == (200, {"ready": True, "model": "tiny", "kernels": {}})
        _kill_thread(engine.worker.ident)
        await asyncio.wait_for(stop.wait(), 10.0)
        await watcher
        with pytest.raises(Overloaded, match="worker stopped"):
            await engine.push(sid, ["after the worker died"])
        assert await _ready_reply(engine) == (503, {"ready": False, "status": "worker_failed"})
        return healthy, engine.worker_failed

    healthy, failed = run_engine(model, scenario)
    assert healthy and failed
    messages = waiting(sock)
    assert {"WATCHDOG": "1"} in messages
    assert messages[-1] == {"STATUS": "the inference worker died; stopping"}
