"""The client verbs of the ``livelm`` command (push, query, watch, status), run as the real
entry point in a subprocess against a real daemon on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from livelm.client import HttpClient
from livelm.client.entries_input import InputError, read_entries
from tests.daemon_process import DaemonProcess, free_port

TIMEOUT = 120.0
BARS = [
    {
        "symbol": "AAPL",
        "t": f"09:{30 + i}",
        "o": 187 + i,
        "h": 188.5 + i,
        "l": 186.25,
        "c": 187.5,
        "v": 900 + i,
    }
    for i in range(7)
]


def livelm(
    daemon: DaemonProcess | None, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    ports = ["--port", str(daemon.port), "--tcp-port", str(daemon.tcp_port)] if daemon else []
    return subprocess.run(
        [sys.executable, "-m", "livelm.daemon", *args, *ports],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=None if not env else {**os.environ, **env},
    )


def watch_process(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    ports = ["--port", str(daemon.port), "--tcp-port", str(daemon.tcp_port)]
    return subprocess.Popen(
        [sys.executable, "-m", "livelm.daemon", "watch", *args, *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def session_name(label: str) -> str:
    return f"cli-{label}-{uuid.uuid4().hex[:8]}"


def library(daemon: DaemonProcess, method: str, *args: Any, **options: Any) -> Any:
    """One call of the async HTTP client, to check what a verb did."""

    async def call() -> Any:
        async with HttpClient(daemon.url) as client:
            return await getattr(client, method)(*args, **options)

    return asyncio.run(call())


def jsonl(entries: list[Any]) -> str:
    return "".join(json.dumps(entry) + "\n" for entry in entries)


def csv_text(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(row[key]) for key in header) for row in rows]
    return "\n".join(lines) + "\n"


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- push, status, query ---------------------------------------------------------------------


def test_push_a_jsonl_file_then_status_and_query(
    demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    sid = session_name("jsonl")
    feed = tmp_path / "bars.jsonl"
    feed.write_text(jsonl(BARS), encoding="utf-8")
    init = ["--init-prompt", "Market data.", "--template", "raw", "--format", "ohlcv"]
    out = ok(livelm(demo_daemon, "push", "--session", sid, *init, "--batch", "4", str(feed)))
    assert f"pushed 7 entries to {sid}; last seq 7" in out

    status = json.loads(ok(livelm(demo_daemon, "status", "--session", sid, "--json")))
    assert (status["data_seq"], status["entries"], status["format"]) == (7, 7, "ohlcv")
    table = ok(livelm(demo_daemon, "status", "--session", sid))
    assert "data_seq" in table and " 7\n" in table

    expected = library(demo_daemon, "generate", sid, "Up or down?", max_tokens=6)
    ask = ["query", "--session", sid, "Up or down?", "--max-tokens", "6"]
    reply = json.loads(ok(livelm(demo_daemon, *ask, "--json")))
    assert reply["tokens"] == expected.tokens and reply["data_seq"] == 7
    assert ok(livelm(demo_daemon, *ask)) == expected.text + "\n"
    streamed = ok(livelm(demo_daemon, *ask, "--stream", "--transport", "tcp"))
    assert streamed == expected.text + "\n"
    library(demo_daemon, "close_session", sid)


def test_csv_rows_become_objects_keyed_by_the_header(demo_daemon: DaemonProcess) -> None:
    from_csv, from_jsonl = session_name("csv"), session_name("csv-ref")
    init = ["--init-prompt", "Market data.", "--template", "raw", "--format", "ohlcv"]
    ok(
        livelm(
            demo_daemon,
            "push",
            "--session",
            from_csv,
            *init,
            "--input",
            "csv",
            "-",
            stdin=csv_text(BARS),
        )
    )
    ok(livelm(demo_daemon, "push", "--session", from_jsonl, *init, "-", stdin=jsonl(BARS)))
    # ohlcv refuses strings where numbers belong: the CSV cells arrived as numbers
    csv_status = library(demo_daemon, "status", from_csv)
    assert csv_status.data_seq == 7
    assert csv_status.context_tokens == library(demo_daemon, "status", from_jsonl).context_tokens
    answers = [
        library(demo_daemon, "generate", sid, "Trend?", max_tokens=5).tokens
        for sid in (from_csv, from_jsonl)
    ]
    assert answers[0] == answers[1]
    for sid in (from_csv, from_jsonl):
        library(demo_daemon, "close_session", sid)


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_push_from_stdin_over_each_transport(demo_daemon: DaemonProcess, transport: str) -> None:
    sid = library(demo_daemon, "init", "Log.", template="raw").session_id
    lines = jsonl([f"event {i}" for i in range(5)])
    args = ["push", "--session", sid, "--transport", transport, "--batch", "2", "-"]
    library(demo_daemon, "push", sid, ["before"])
    assert "pushed 5 entries" in ok(livelm(demo_daemon, *args, stdin=lines))
    assert library(demo_daemon, "status", sid).data_seq == 6
    library(demo_daemon, "close_session", sid)


def test_query_with_choices_prints_the_label(demo_daemon: DaemonProcess) -> None:
    sid = library(demo_daemon, "init", "Answer yes or no.", template="raw").session_id
    label = ok(livelm(demo_daemon, "query", "--session", sid, "Is it up?", "--choices", "yes,no"))
    assert label.strip() in ("yes", "no")
    reply = json.loads(
        ok(
            livelm(
                demo_daemon, "query", "--session", sid, "Is it up?", "--choices", "yes,no", "--json"
            )
        )
    )
    assert reply["choice"] == label.strip() and set(reply["probs"]) == {"yes", "no"}
    library(demo_daemon, "close_session", sid)


# ---- watch ----------------------------------------------------------------------------------------


def wait_watching(process: subprocess.Popen[str]) -> None:
    assert process.stderr is not None
    line = process.stderr.readline()
    assert "watching session" in line, line + process.stderr.read()


@pytest.mark.parametrize("transport", ["http", "tcp"])
def test_watch_prints_flash_answers(demo_daemon: DaemonProcess, transport: str) -> None:
    sid = library(demo_daemon, "init", "Feed.", template="raw").session_id
    args = ["--session", sid, "--flash", "What is new?", "--max-tokens", "3", "--count", "1"]
    process = watch_process(demo_daemon, *args, "--json", "--transport", transport)
    try:
        wait_watching(process)
        library(demo_daemon, "push", sid, ["fresh data"])
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == 0, err
    (line,) = out.splitlines()
    event = json.loads(line)
    assert (event["event"], event["session_id"], event["query"]) == (
        "flash_answer",
        sid,
        "What is new?",
    )
    library(demo_daemon, "close_session", sid)


async def push_until_ingested_then_close(daemon: DaemonProcess, sid: str) -> None:
    async with HttpClient(daemon.url) as client:
        events = await client.subscribe(sid, ["data"])
        await client.push(sid, ["one"])
        await asyncio.wait_for(anext(events), TIMEOUT)  # its data update is out
        await client.close_session(sid)


def test_watch_ends_when_the_session_closes(demo_daemon: DaemonProcess) -> None:
    sid = library(demo_daemon, "init", "Feed.", template="raw").session_id
    process = watch_process(demo_daemon, "--session", sid, "--data")
    try:
        wait_watching(process)
        asyncio.run(push_until_ingested_then_close(demo_daemon, sid))
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "data:" in out  # the data update of the push came before the end


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--session", "s"],
        ["watch", "--session", "s"],
        ["push", "--session", "s", "-"],
        ["query", "--session", "s", "hi", "--transport", "ws"],
    ],
)
def test_daemon_down_exits_3_with_one_line(args: list[str]) -> None:
    down = ["--port", str(free_port()), "--tcp-port", str(free_port())]
    result = livelm(None, *args, *down, stdin="")
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "cannot connect to the daemon" in result.stderr


@pytest.mark.parametrize(
    "verb",
    [
        ["status"],
        ["query", "hi", "--transport", "ws"],
        ["push", "-"],
        ["watch", "--transport", "tcp"],
    ],
)
def test_unknown_session_exits_1(demo_daemon: DaemonProcess, verb: list[str]) -> None:
    result = livelm(demo_daemon, verb[0], "--session", "nope", *verb[1:], stdin='"x"\n')
    assert result.returncode == 1, result.stderr
    assert "unknown session 'nope' (unknown_session)" in result.stderr
    assert result.stderr.count("\n") == 1


def test_bad_input_exits_2_naming_the_line(demo_daemon: DaemonProcess, tmp_path: Path) -> None:
    sid = library(demo_daemon, "init", "", template="raw").session_id
    feed = tmp_path / "bad.jsonl"
    feed.write_text('"ok"\n{"broken": \n', encoding="utf-8")
    result = livelm(demo_daemon, "push", "--session", sid, str(feed))
    assert result.returncode == 2 and "line 2: not valid JSON" in result.stderr
    assert library(demo_daemon, "status", sid).data_seq == 0  # a file is checked before pushing

    missing = livelm(demo_daemon, "push", "--session", sid, str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr

    # stdin is pushed as it comes: what came before the bad line stays pushed, and says so
    piped = livelm(
        demo_daemon, "push", "--session", sid, "--batch", "1", "-", stdin='"a"\n"b"\nnot json\n'
    )
    assert piped.returncode == 2 and "line 3" in piped.stderr
    assert "2 entries were pushed (last seq 2)" in piped.stderr
    assert library(demo_daemon, "status", sid).data_seq == 2

    usage = livelm(demo_daemon, "push", "--session", sid, "--format", "ohlcv", "-", stdin="")
    assert usage.returncode == 2 and "--init-prompt" in usage.stderr
    library(demo_daemon, "close_session", sid)


def test_init_prompt_pushes_into_the_session_a_rerun_finds_open(demo_daemon: DaemonProcess) -> None:
    # running the README's command again (more bars the next day) used to fail: already exists
    sid = library(demo_daemon, "init", "", template="raw").session_id
    again = ["push", "--session", sid, "--init-prompt", "again", "--template", "raw", "-"]
    result = livelm(demo_daemon, *again, stdin='"x"\n')
    assert result.returncode == 0 and "open already" in result.stderr, result.stderr
    assert library(demo_daemon, "status", sid).data_seq == 1
    other = ["push", "--session", sid, "--init-prompt", "again", "--format", "ohlcv", "-"]
    refused = livelm(demo_daemon, *other, stdin='"y"\n')
    assert refused.returncode == 2 and "format 'text', not 'ohlcv'" in refused.stderr
    assert library(demo_daemon, "status", sid).data_seq == 1
    library(demo_daemon, "close_session", sid)


# ---- reading entries ------------------------------------------------------------------------------


def test_csv_cells_that_read_as_numbers_become_numbers() -> None:

    text = "t,price,volume,note,code\n09:30,187.25,900,up,1_000\n09:31,nan,-3,,7e2\n"
    rows = list(read_entries(io.StringIO(text), "csv"))
    assert rows == [
        {"t": "09:30", "price": 187.25, "volume": 900, "note": "up", "code": "1_000"},
        {"t": "09:31", "price": "nan", "volume": -3, "note": "", "code": 700.0},
    ]
    with pytest.raises(InputError, match="line 3: 2 fields, the header has 3"):
        list(read_entries(io.StringIO("a,b,c\n1,2,3\n1,2\n"), "csv"))


# ---- audit fixes ----------------------------------------------------------------------------------


def test_a_refused_entry_is_named_by_its_file_line(
    demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    sid = session_name("badline")
    bad = {key: value for key, value in BARS[0].items() if key != "h"}
    feed = tmp_path / "bars.jsonl"
    feed.write_text(jsonl(BARS[:5]) + "\n" + jsonl([BARS[5], bad]), encoding="utf-8")
    init = ["--init-prompt", "Bars.", "--template", "raw", "--format", "ohlcv"]
    result = livelm(demo_daemon, "push", "--session", sid, *init, "--batch", "4", str(feed))
    assert result.returncode == 1, result.stderr
    assert "line 8: h: missing" in result.stderr  # the 7th entry, after a blank line
    assert "4 entries were pushed (last seq 4)" in result.stderr  # its batch: data[2]
    library(demo_daemon, "close_session", sid)


def test_csv_with_a_byte_order_mark(demo_daemon: DaemonProcess, tmp_path: Path) -> None:
    sid = session_name("bom")
    feed = tmp_path / "excel.csv"
    feed.write_bytes(b"\xef\xbb\xbf" + csv_text(BARS).encode())
    init = ["--init-prompt", "Bars.", "--template", "raw", "--format", "ohlcv"]
    assert "pushed 7 entries" in ok(livelm(demo_daemon, "push", "--session", sid, *init, str(feed)))
    library(demo_daemon, "close_session", sid)


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_a_value_messagepack_cannot_hold_is_bad_input(
    demo_daemon: DaemonProcess, tmp_path: Path, transport: str
) -> None:
    sid = library(demo_daemon, "init", "", template="raw", format="kv").session_id
    feed = tmp_path / "big.csv"
    feed.write_text(f"id,sym\n1,a\n{2**70},b\n", encoding="utf-8")
    result = livelm(demo_daemon, "push", "--session", sid, "--transport", transport, str(feed))
    assert result.returncode == 2, result.stderr
    assert "line 3: cannot be sent" in result.stderr and "Traceback" not in result.stderr
    assert library(demo_daemon, "status", sid).data_seq == 0  # found before pushing
    ok(livelm(demo_daemon, "push", "--session", sid, "--transport", "http", str(feed)))
    library(demo_daemon, "close_session", sid)


def test_status_shows_the_error_field(demo_daemon: DaemonProcess) -> None:
    sid = library(demo_daemon, "init", "", template="raw").session_id
    status = json.loads(ok(livelm(demo_daemon, "status", "--session", sid, "--json")))
    assert "error" in status and status["error"] is None
    library(demo_daemon, "close_session", sid)


async def flash_answered(daemon: DaemonProcess, sid: str) -> None:
    async with HttpClient(daemon.url) as client:
        events = await client.subscribe(sid, ["flash"])
        await client.flash(sid, "What is new?", max_tokens=3)
        await client.push(sid, ["fresh data"])
        await asyncio.wait_for(anext(events), TIMEOUT)
        await events.aclose()


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_watch_prints_the_cached_answers_first(demo_daemon: DaemonProcess, transport: str) -> None:
    sid = library(demo_daemon, "init", "Feed.", template="raw").session_id
    asyncio.run(flash_answered(demo_daemon, sid))
    args = ["watch", "--session", sid, "--count", "1", "--json", "--transport", transport]
    (line,) = ok(livelm(demo_daemon, *args)).splitlines()
    assert json.loads(line)["query"] == "What is new?"
    library(demo_daemon, "close_session", sid)


@pytest.mark.parametrize("stream", [True, False])
def test_a_closed_stdout_ends_quietly(demo_daemon: DaemonProcess, stream: bool) -> None:
    sid = library(demo_daemon, "init", "Story.", template="raw").session_id
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails: the reader went away, as `| head` does
    ask = ["query", "--session", sid, "Go on", "--max-tokens", "8"] + (["--stream"] * stream)
    ports = ["--port", str(demo_daemon.port), "--tcp-port", str(demo_daemon.tcp_port)]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "livelm.daemon", *ask, *ports],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr
    library(demo_daemon, "close_session", sid)


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_a_peer_of_another_protocol_exits_3(demo_daemon: DaemonProcess, transport: str) -> None:
    swapped = ["--port", str(demo_daemon.tcp_port), "--tcp-port", str(demo_daemon.port)]
    args = ["status", "--session", "s", "--transport", transport, *swapped]
    result = livelm(None, *args)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
