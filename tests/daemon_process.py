"""A real daemon in a subprocess on loopback, for end-to-end tests.

``start_daemon([...])`` picks free ports, runs ``python -m livelm.daemon serve``, waits until
``GET /ready`` answers 200 and returns a ``DaemonProcess``; if the daemon dies or never gets
ready, the test fails with its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

POLL_SECONDS = 0.1
STOP_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaemonProcess:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, log_path: Path, *, tcp_port: int = 0
    ) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/ws"
        self.tcp_port = tcp_port  # framed MessagePack (0 if the args chose none)
        self.log_path = log_path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait for the drain, return the exit code (kills it if it hangs)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon did not stop within {timeout}s of SIGTERM\n{self.log_text()}"
            ) from exc

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_daemon(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 120,
    *,
    log_dir: Path | None = None,
) -> DaemonProcess:
    """Start ``livelm serve`` on a free loopback port with ``args``; return once it is ready.

    The daemon's output goes to a log file in ``log_dir`` (a pytest tmp dir is best: pytest
    prunes old ones), else in the system's temp folder.
    """
    port = free_port()
    command = [sys.executable, "-m", "livelm.daemon", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    if "--tcp-port" in args:
        tcp_port = int(args[args.index("--tcp-port") + 1])
    else:
        tcp_port = free_port()
        command += ["--tcp-port", str(tcp_port)]
    log_file = tempfile.NamedTemporaryFile(
        prefix="livelm-daemon-", suffix=".log", dir=log_dir, delete=False
    )
    proc = subprocess.Popen(
        command + list(args),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    log_file.close()
    daemon = DaemonProcess(proc, port, Path(log_file.name), tcp_port=tcp_port)
    _wait_ready(daemon, timeout)
    return daemon


def _wait_ready(daemon: DaemonProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise AssertionError(
                f"daemon exited with code {daemon.proc.returncode} before it was ready\n"
                f"{daemon.log_text()}"
            )
        if _ready(daemon.url):
            return
        time.sleep(POLL_SECONDS)
    daemon.proc.kill()
    daemon.proc.wait()
    raise AssertionError(f"daemon not ready within {timeout}s\n{daemon.log_text()}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        # HTTPError (503 while loading) is a URLError too
        return False
