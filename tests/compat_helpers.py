"""Daemons and plain-HTTP helpers shared by the OpenAI and Anthropic API tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from tests.daemon_process import DaemonProcess, start_daemon
from tests.scripted_model import make_scripted_checkpoint

TIMEOUT = 60
API_KEY = "sk-compat-test"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def start_scripted_daemon(root: Path, style: str) -> DaemonProcess:
    """A daemon serving the scripted tool-calling model of ``style``, behind ``API_KEY``."""
    folder = make_scripted_checkpoint(root / f"scripted-{style}", style)
    args = ["--model", str(folder), "--cache-dir", str(root / "cache"), "--log-format", "text"]
    return start_daemon(args, env={"LIVELM_API_KEYS": API_KEY}, log_dir=root)


def serve_scripted(root: Path, style: str) -> Iterator[DaemonProcess]:
    """A module fixture's body: the scripted daemon, stopped cleanly after the module."""
    daemon = start_scripted_daemon(root, style)
    yield daemon
    assert daemon.stop() == 0, daemon.log_text()


def start_capped_demo_daemon(root: Path, max_new_tokens: int) -> DaemonProcess:
    """The demo model with a small ``max_new_tokens``, the ceiling a larger ``max_tokens``
    is clamped to."""
    args = ["--model", "demo", "--cache-dir", str(root / "cache"), "--log-format", "text"]
    env = {"LIVELM_MAX_NEW_TOKENS": str(max_new_tokens)}
    return start_daemon(args, env=env, log_dir=root)


def post(daemon: DaemonProcess, path: str, body: Any, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(daemon.url + path, json=body, headers=headers, timeout=TIMEOUT)


def open_raw_session(daemon: DaemonProcess, prompt: str, data: list[str]) -> str:
    reply = post(daemon, "/v1/sessions/init", {"prompt": prompt, "template": "raw"})
    reply.raise_for_status()
    session_id = reply.json()["session_id"]
    if data:
        post(daemon, f"/v1/sessions/{session_id}/stream/push", {"data": data}).raise_for_status()
    return session_id


def session_generate(daemon: DaemonProcess, session_id: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    reply = post(daemon, f"/v1/sessions/{session_id}/generate", body)
    reply.raise_for_status()
    return reply.json()
