"""Shared fixtures: a real demo daemon on loopback for the end-to-end tests, and a stream to
catch the daemon's log records in."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from tests.daemon_process import DaemonProcess, start_daemon


@pytest.fixture(scope="session")
def demo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon serving the built-in demo model for the whole test session."""
    cache = tmp_path_factory.mktemp("livelm-cache")
    args = ["--model", "demo", "--cache-dir", str(cache), "--log-format", "text"]
    daemon = start_daemon(args, log_dir=cache)
    yield daemon
    code = daemon.stop()
    assert code == 0, f"daemon exited with {code} after SIGTERM\n{daemon.log_text()}"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A stream for ``setup_logging``; the root logger's handlers are put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
