"""Sessions over HTTP on a real daemon: exact answers, bad input, and nothing accepted lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon_process import DaemonProcess, start_daemon
from tests.tiny_models import hf_greedy, make_tiny_checkpoint

TIMEOUT = 60


@pytest.fixture(scope="module")
def llama_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("http-llama"), "llama", seed=3)
    args = ["--model", str(folder), "--dtype", "float32", "--kv-cache-tokens", "8192",
            "--max-batch-tokens", "32", "--cache-dir", str(folder / "cache"), "--log-format", "text"]
    with start_daemon(args, log_dir=folder) as daemon:
        yield daemon, folder


def post(daemon: DaemonProcess, path: str, body=None, **kw) -> requests.Response:
    return requests.post(f"{daemon.url}{path}", json=body, timeout=TIMEOUT, **kw)


def open_session(daemon: DaemonProcess, **init) -> str:
    reply = post(daemon, "/v1/sessions/init", init)
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


def status(daemon: DaemonProcess, sid: str) -> dict:
    return requests.get(f"{daemon.url}/v1/sessions/{sid}/stream/status", timeout=TIMEOUT).json()


def test_greedy_answers_over_http_equal_transformers(llama_daemon) -> None:
    from transformers import PreTrainedTokenizerFast

    daemon, folder = llama_daemon
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    eos = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
    sid = open_session(daemon, prompt="Tick feed.", template="raw", format="json")
    records = [{"px": 100 + i, "sym": "ES"} for i in range(12)]
    ids = tok("Tick feed.")["input_ids"]
    for i in range(0, 12, 3):
        assert post(daemon, f"/v1/sessions/{sid}/stream/push", {"data": records[i : i + 3]}).json()["seq"] == i + 3
        for r in records[i : i + 3]:  # json format: compact, sorted keys, one line
            ids += tok.encode(f'{{"px":{r["px"]},"sym":"ES"}}\n', add_special_tokens=False)
        done = post(daemon, f"/v1/sessions/{sid}/generate", {"prompt": "Next px?", "max_tokens": 5}).json()
        expected = hf_greedy(folder, ids + tok.encode("Next px?", add_special_tokens=False), 5)
        assert done["data_seq"] == i + 3
        n = len(done["tokens"])
        assert done["tokens"] == expected[:n]
        if done["finish_reason"] == "stop":  # ended at an end-of-sequence token
            assert expected[n] in eos
        else:
            assert done["finish_reason"] == "length" and n == 5


BAD_REQUESTS = [
    # (path template, body or raw bytes, expected status, words the message must hold)
    ("/v1/sessions/{sid}/stream/push", b"{not json", 400, "json"),
    ("/v1/sessions/{sid}/stream/push", {"data": "not a list"}, 400, "data"),
    ("/v1/sessions/{sid}/stream/push", {"data": []}, 400, "empty"),
    ("/v1/sessions/{sid}/stream/push", {"data": [{"an": "object"}]}, 400, "text"),
    ("/v1/sessions/{sid}/stream/push", {"data": ["x " * 9000]}, 413, "tokens"),
    ("/v1/sessions/{sid}/stream/push", {"data": ["x"] * 10001}, 413, "entries"),
    ("/v1/sessions/nope/stream/push", {"data": ["x"]}, 404, "nope"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "temperature": -1}, 400, "temperature"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "top_p": 0}, 400, "top_p"),
    ("/v1/sessions/{sid}/generate", {"prompt": ""}, 400, "empty"),
    ("/v1/sessions/{sid}/generate", {"prompt": " \n "}, 400, "empty"),
    ("/v1/sessions/{sid}/generate", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "stop": [""]}, 400, "stop"),
    ("/v1/sessions/nope/generate", {"prompt": "q"}, 404, "nope"),
    ("/v1/sessions/init", {"template": "fancy"}, 400, "template"),
    ("/v1/sessions/init", {"window": -5}, 400, "window"),
    ("/v1/sessions/init", {"session_id": "bad id with spaces"}, 400, "session_id"),
    ("/v1/sessions/init", {"session_id": "feed\n"}, 400, "session_id"),
    ("/v1/sessions/{sid}/stream/push", b'{"data": [' + b"[" * 5000 + b"1" + b"]" * 5000 + b"]}",
     400, "nested too deeply"),
    ("/v1/sessions/init", {"session_id": ".."}, 400, "dots"),
    ("/v1/sessions/{sid}/generate", {"prompt": "q", "temperature": 1, "seed": 2**64}, 400, "seed"),
    ("/v1/sessions/init", {"prompt": 42}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "code", "words"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_4xx(demo_daemon: DaemonProcess, path, body, code, words) -> None:
    sid = open_session(demo_daemon, template="raw")
    url = demo_daemon.url + path.format(sid=sid)
    if isinstance(body, bytes):
        reply = requests.post(url, data=body, timeout=TIMEOUT)
    else:
        reply = requests.post(url, json=body, timeout=TIMEOUT)
    assert reply.status_code == code, reply.text
    error = reply.json()["error"]
    assert words.lower() in error["message"].lower(), error
    assert status(demo_daemon, sid)["data_seq"] == 0  # the failed request accepted nothing


def test_an_empty_question_is_refused_on_a_chat_session_too(demo_daemon: DaemonProcess) -> None:
    sid = open_session(demo_daemon, prompt="You watch ticks.")  # chat: the template's default
    reply = post(demo_daemon, f"/v1/sessions/{sid}/generate", {"prompt": "", "max_tokens": 2})
    assert reply.status_code == 400 and "empty" in reply.json()["error"]["message"]


def test_a_vanishing_temperature_is_greedy(demo_daemon: DaemonProcess) -> None:
    # 1e-45 is in range but dividing the logits by it overflowed to inf/nan (a 500)
    sid = open_session(demo_daemon, prompt="Ticks.", template="raw")
    ask = {"prompt": "Next?", "max_tokens": 4}
    tiny = post(demo_daemon, f"/v1/sessions/{sid}/generate", ask | {"temperature": 1e-45})
    assert tiny.status_code == 200, tiny.text
    greedy = post(demo_daemon, f"/v1/sessions/{sid}/generate", ask | {"temperature": 0})
    assert tiny.json()["tokens"] == greedy.json()["tokens"]


def test_a_top_k_past_the_vocabulary_keeps_every_token(demo_daemon: DaemonProcess) -> None:
    # 2**63 used to overflow the worker's int64 tensor and kill it (and with it the daemon)
    sid = open_session(demo_daemon, prompt="Ticks.", template="raw")
    ask = {"prompt": "Next?", "max_tokens": 4, "temperature": 1.0, "seed": 7}
    huge = post(demo_daemon, f"/v1/sessions/{sid}/generate", ask | {"top_k": 2**63})
    assert huge.status_code == 200, huge.text
    off = post(demo_daemon, f"/v1/sessions/{sid}/generate", ask | {"top_k": 0})
    assert huge.json()["tokens"] == off.json()["tokens"]
    assert requests.get(f"{demo_daemon.url}/ready", timeout=TIMEOUT).status_code == 200


def test_duplicate_session_id_and_delete(demo_daemon: DaemonProcess) -> None:
    sid = open_session(demo_daemon, session_id="desk-7", template="raw")
    assert post(demo_daemon, "/v1/sessions/init", {"session_id": "desk-7"}).status_code == 400
    reply = requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)
    assert reply.json() == {"closed": True, "session_id": "desk-7"}
    assert requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT).status_code == 404
    assert requests.get(f"{demo_daemon.url}/v1/sessions/{sid}/stream/status", timeout=TIMEOUT).status_code == 404


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["stream/push", "generate"]), body=json_values)
def test_fuzzed_bodies_never_break_the_daemon(demo_daemon: DaemonProcess, route: str, body) -> None:
    sid = open_session(demo_daemon, template="raw", format="json")
    before = status(demo_daemon, sid)["data_seq"]
    if route == "generate" and isinstance(body, dict):
        body["max_tokens"] = 2  # keep answers short when the fuzz happens to be valid
    reply = post(demo_daemon, f"/v1/sessions/{sid}/{route}", body)
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        assert reply.json()["error"]["message"]
        assert status(demo_daemon, sid)["data_seq"] == before
    requests.delete(f"{demo_daemon.url}/v1/sessions/{sid}", timeout=TIMEOUT)


def test_other_sessions_keep_working_through_bad_input(demo_daemon: DaemonProcess) -> None:
    good = open_session(demo_daemon, template="raw")
    for i in range(5):
        assert post(demo_daemon, f"/v1/sessions/{good}/stream/push", {"data": [f"row {i}"]}).status_code == 200
        requests.post(f"{demo_daemon.url}/v1/sessions/{good}/stream/push", data=b"\xff\xfe garbage", timeout=TIMEOUT)
        post(demo_daemon, f"/v1/sessions/{good}/generate", {"prompt": "q", "max_tokens": -1})
    done = post(demo_daemon, f"/v1/sessions/{good}/generate", {"prompt": "and now?", "max_tokens": 3}).json()
    assert done["data_seq"] == 5
    final = status(demo_daemon, good)
    assert final["data_seq"] == final["ingested_seq"] == 5 and final["entries"] == 5


def test_a_generate_sees_every_acknowledged_push(demo_daemon: DaemonProcess) -> None:
    sid = open_session(demo_daemon, template="raw")
    for i in range(1, 30):
        assert post(demo_daemon, f"/v1/sessions/{sid}/stream/push", {"data": [f"tick {i}"]}).json()["seq"] == i
        done = post(demo_daemon, f"/v1/sessions/{sid}/generate", {"prompt": "?", "max_tokens": 1}).json()
        assert done["data_seq"] >= i
