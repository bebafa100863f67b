"""Shared fixtures: a real demo daemon on loopback for the end-to-end tests."""

from __future__ import annotations

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
