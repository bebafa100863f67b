"""`make run` serves the demo model, and the README's curl walk-through works as written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.daemon_process import free_port

REPO = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md lost its walk-through block"
    return match.group(1)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"make run exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"daemon not ready after {timeout}s:\n{log.read_text()}")


def test_make_run_serves_demo_and_walkthrough_runs_as_written(tmp_path: Path) -> None:
    port, tcp_port = free_port(), free_port()
    log = tmp_path / "make-run.log"
    args = f"ARGS=--tcp-port {tcp_port} --cache-dir {tmp_path / 'cache'} --log-format text"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "-s", "run", f"PORT={port}", args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        assert requests.get(f"{url}/ready", timeout=5).json()["model"] == "demo"
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough()],
            env={**os.environ, "LIVELM": url}, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith("session: s_")
        assert json.loads(lines[1])["seq"] == 2
        answer = json.loads(lines[2])
        assert answer["data_seq"] == 2 and answer["usage"]["completion_tokens"] >= 1
        status = json.loads(lines[3])
        assert status["ingested_seq"] == 2 and status["entries"] == 2
        assert "event: done" in run.stdout
        assert json.loads(lines[-1]) == {"closed": True, "session_id": lines[0].split()[1]}
    finally:
        # GNU make passes SIGTERM on to the daemon it runs, which drains and stops
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text()
    assert "SIGTERM received" in text, text
    assert re.search(r"livelm\.daemon\.app: stopped$", text, re.M), text
    assert "second SIGTERM" not in text, text
