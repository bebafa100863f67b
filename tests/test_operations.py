"""Running as a service: signals that must not kill the daemon, JSON logs that stay JSON lines
(start-up progress included), journald priority prefixes, and the open-access warning."""

from __future__ import annotations

import io
import json
import logging
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from livelm.daemon.app import is_loopback, warn_if_open
from livelm.daemon.config import Config
from livelm.daemon.logs import get_logger, setup_logging, syslog_priority
from livelm.daemon.progress import Output, Progress, output_for
from tests.daemon_process import DaemonProcess, start_daemon

LOG_WAIT_S = 30.0  # a deadline for a line to reach the log, not a timing assertion


def wait_for_log(daemon: DaemonProcess, text: str) -> str:
    """The daemon's log once it holds ``text``; fails if the daemon dies or never logs it."""
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        log = daemon.log_text()
        if text in log:
            return log
        if not daemon.alive():
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}\n{log}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never reached the log\n{daemon.log_text()}")


def get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status


def demo_args(tmp_path: Path, log_format: str) -> list[str]:
    return ["--model", "demo", "--cache-dir", str(tmp_path), "--log-format", log_format]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- signals ----------------------------------------------------------------------------------


def test_sighup_and_sigusr1_are_logged_and_ignored(tmp_path: Path) -> None:
    daemon = start_daemon(demo_args(tmp_path, "text"), log_dir=tmp_path)
    try:
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            daemon.proc.send_signal(signum)
            log = wait_for_log(daemon, f"{signum.name} received and ignored")
            line = next(x for x in log.splitlines() if f"{signum.name} received" in x)
            assert " WARNING " in line and "does not reload its configuration" in line
            assert get_status(daemon.url + "/health") == 200
            assert get_status(daemon.url + "/ready") == 200
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()
    assert "draining" in daemon.log_text()


# ---- log formats ------------------------------------------------------------------------------


def test_json_logs_are_json_lines_with_progress_records(tmp_path: Path) -> None:
    env = {"LIVELM_API_KEY": "client-key"}  # the clients' variable, set where the daemon runs
    daemon = start_daemon(demo_args(tmp_path, "json"), env=env, log_dir=tmp_path)
    assert daemon.stop() == 0
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not a JSON line: {line!r}") from exc
    # on a GPU, kernel warm-up and graph capture report as stages of their own
    progress = [r for r in records if r["logger"] == "livelm.progress"]
    loading = [r for r in progress if r["stage"] == "loading demo"]
    assert 1 <= len(loading) <= 4, lines  # a few records per stage, not one per tensor
    for stage in {r["stage"] for r in progress}:
        assert sum(r["stage"] == stage for r in progress) <= 4, stage
    last = loading[-1]
    assert last["level"] == "info" and last["done"] == last["total"] > 0
    assert isinstance(last["seconds"], float)
    warnings = [r["msg"] for r in records if r["level"] == "warning"]
    assert "ignoring environment variable LIVELM_API_KEY (did you mean LIVELM_API_KEYS?)" in warnings


def test_syslog_prefix_gives_every_line_its_priority(tmp_path: Path) -> None:
    env = {"LIVELM_LOG_SYSLOG_PREFIX": "true", "LIVELM_FROBNICATE": "1"}
    daemon = start_daemon(demo_args(tmp_path, "text"), env=env, log_dir=tmp_path)
    assert daemon.stop() == 0
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    assert all(line[:3] in ("<4>", "<6>") for line in lines), lines
    assert any(line.startswith("<4>") and "LIVELM_FROBNICATE" in line for line in lines)
    assert any(line.startswith("<6>") and "starting livelm" in line for line in lines)
    # the start-up progress goes through the log too (stderr is a file here, not a terminal)
    assert any(line.startswith("<6>") and "livelm.progress: loading demo" in line for line in lines)


def test_syslog_priorities_per_level_and_on_every_line(log_stream: io.StringIO) -> None:
    setup_logging("debug", "text", log_stream, syslog_prefix=True)
    log = get_logger("livelm.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.critical("c")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("e")
    lines = log_stream.getvalue().splitlines()
    assert [line[:3] for line in lines[:4]] == ["<7>", "<6>", "<4>", "<2>"]
    traceback = lines[4:]
    assert len(traceback) > 2 and all(line.startswith("<3>") for line in traceback)
    assert any("ValueError: boom" in line for line in traceback)
    assert syslog_priority(logging.ERROR) == 3


def test_no_syslog_prefix_by_default(log_stream: io.StringIO) -> None:
    setup_logging("info", "json", log_stream)
    get_logger("livelm.test").warning("w")
    assert json.loads(log_stream.getvalue())["msg"] == "w"


# ---- progress follows the log format ----------------------------------------------------------


def run_progress(stream: io.StringIO, total: int = 100) -> None:
    with Progress(total, "warm-up", stream) as bar:
        for _ in range(total):
            bar.update(1)


def test_progress_with_json_logs_is_json_records(log_stream: io.StringIO) -> None:
    setup_logging("info", "json", log_stream)
    assert output_for(log_stream) is Output.RECORDS
    run_progress(log_stream)
    records = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [r["done"] for r in records] == [25, 50, 75, 100]
    assert all(r["stage"] == "warm-up" and r["total"] == 100 for r in records)
    assert records[-1]["msg"] == "warm-up: 100%" and records[-1]["logger"] == "livelm.progress"


def test_progress_with_json_logs_on_a_terminal_is_json_records(log_stream: io.StringIO) -> None:
    terminal = _Terminal()
    setup_logging("info", "json", terminal)
    assert output_for(terminal) is Output.RECORDS
    run_progress(terminal, total=3)
    assert "\r" not in terminal.getvalue()
    for line in terminal.getvalue().splitlines():
        json.loads(line)


def test_progress_with_text_logs_on_a_terminal_keeps_the_bar(log_stream: io.StringIO) -> None:
    terminal = _Terminal()
    setup_logging("info", "text", terminal)
    assert output_for(terminal) is Output.BAR
    run_progress(terminal, total=3)
    text = terminal.getvalue()
    assert "\r" in text and text.count("\n") == 1 and "100% (3/3)" in text


def test_progress_without_log_setup_writes_plain_lines() -> None:
    stream = io.StringIO()
    assert output_for(stream) is Output.LINES
    run_progress(stream)
    assert stream.getvalue().splitlines()[-1].startswith("warm-up: 100% (100/100)")


# ---- open access ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
     ("example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_host_without_keys_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="livelm.daemon.app"):
        warn_if_open(Config(host="0.0.0.0"))
        warn_if_open(Config(host="0.0.0.0", api_keys=["k"]))
        warn_if_open(Config(host="127.0.0.1"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "listening on 0.0.0.0 without api_keys" in warnings[0].getMessage()
