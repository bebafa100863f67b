"""The session journal: its files read back as written (torn tails, rewrites, another model's
files set aside), and sessions that come back, exact, after a daemon is killed and restarted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from livelm.daemon.engine.engine import Engine
from livelm.daemon.engine.journal import Journal, Saved
from livelm.daemon.model.demo import ensure_demo_model
from livelm.protocol.errors import ConfigError
from livelm.protocol.messages import FlashSpec, InitRequest
from tests.daemon_process import start_daemon
from tests.engine_harness import loaded, run_engine
from tests.sse_client import SseStream

TIMEOUT = 60


def _journal(folder: Path, tokenizer: str = "tokenizer-a") -> Journal:
    return Journal(folder, "demo", tokenizer, 512)


def _read(folder: Path) -> list[Saved]:
    """What a fresh start would restore from ``folder``."""
    journal = _journal(folder)
    try:
        return journal.saved()
    finally:
        journal.close()


def _entries(saved: Saved) -> list[tuple[int, list[int]]]:
    return [(seq, tokens.tolist()) for seq, tokens in saved.entries]


def _opened(journal: Journal, session_id: str = "desk") -> Saved:
    init = InitRequest(prompt="Feed.", session_id=session_id, template="raw", window=300)
    return Saved(journal.header(init), flash=[FlashSpec(query="Up?", max_tokens=3)])


def test_a_journal_reads_back_what_was_written(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    desk = journal.open(_opened(journal))
    desk.push(1, [[5, 6], [7]], None)
    desk.push(3, [[8, 9, 10], [11]], 2)  # the window dropped seq 1
    desk.flash(FlashSpec(query="Down?"))
    journal.close()
    (saved,) = _read(tmp_path)
    assert saved.session_id == "desk" and saved.header.init.window == 300
    assert _entries(saved) == [(2, [7]), (3, [8, 9, 10]), (4, [11])]
    assert (saved.first_kept, saved.last_seq) == (2, 4)
    assert [s.query for s in saved.flash] == ["Up?", "Down?"]


def test_a_torn_last_frame_is_left_out(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.open(_opened(journal)).push(1, [[5]], None)
    journal.close()
    path = journal.path("desk")
    whole = path.read_bytes()
    journal = _journal(tmp_path)
    journal.open(journal.saved()[0]).push(2, [[6, 7]], None)
    journal.close()
    path.write_bytes(path.read_bytes()[:-3])  # killed in the middle of the last write
    (saved,) = _read(tmp_path)
    assert _entries(saved) == [(1, [5])]
    assert len(whole) < len(path.read_bytes())


def test_trims_rewrite_the_file_to_what_is_retained(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    desk = journal.open(_opened(journal))
    sizes = []
    for seq in range(1, 3001):
        desk.push(seq, [[seq % 500, 1, 2]], seq - 9 if seq > 10 else None)  # keeps 10
        sizes.append(journal.path("desk").stat().st_size)
    journal.close()
    (saved,) = _read(tmp_path)
    assert [seq for seq, _ in saved.entries] == list(range(2991, 3001))
    assert _entries(saved)[-1][1] == [3000 % 500, 1, 2]
    assert max(sizes) < 20 * sizes[20]  # it never grew with the 3000 pushes


def test_another_tokenizers_journal_is_set_aside_and_kept(tmp_path: Path) -> None:
    for round_ in range(2):  # a second set-aside does not overwrite the first
        journal = _journal(tmp_path, tokenizer="tokenizer-b")
        journal.open(_opened(journal)).push(1, [[5 + round_]], None)
        journal.close()
        assert _read(tmp_path) == []
    assert not (tmp_path / "desk.journal").exists()
    failed = sorted(p.name for p in tmp_path.glob("desk.journal.failed*"))
    assert failed == ["desk.journal.failed", "desk.journal.failed.1"]
    (tmp_path / "desk.journal.failed").rename(tmp_path / "desk.journal")  # put back by hand
    journal = _journal(tmp_path, tokenizer="tokenizer-b")
    assert [s.session_id for s in journal.saved()] == ["desk"]
    journal.close()


def _write_one(folder: Path, tokens: list[list[int]]) -> Path:
    journal = _journal(folder)
    desk = journal.open(_opened(journal))
    for i, t in enumerate(tokens):
        desk.push(i + 1, [t], None)
    journal.close()
    return journal.path("desk")


def test_damage_before_the_last_frame_sets_the_file_aside(tmp_path: Path) -> None:
    """Only the last write can be torn by a crash: a flipped byte earlier is corruption, and
    restoring what comes before it would send seqs back."""
    path = _write_one(tmp_path, [[5], [6], [7]])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _read(tmp_path) == []
    assert (tmp_path / "desk.journal.failed").exists()


def test_token_ids_outside_the_vocabulary_set_the_file_aside(tmp_path: Path) -> None:
    _write_one(tmp_path, [[5], [512]])  # the vocabulary has 512 tokens: 0 to 511
    assert _read(tmp_path) == []
    _write_one(tmp_path / "neg", [[-1]])
    assert _read(tmp_path / "neg") == []


def test_a_file_must_hold_the_session_its_name_says(tmp_path: Path) -> None:
    """The id comes from the header but the paths from the file's name: a copied or renamed
    file would otherwise write to another session's file (or outside the folder)."""
    path = _write_one(tmp_path, [[5]])
    path.rename(tmp_path / "other.journal")
    assert _read(tmp_path) == []
    assert (tmp_path / "other.journal.failed").exists()


def test_registering_a_query_again_adds_nothing(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    desk = journal.open(_opened(journal))
    size = journal.path("desk").stat().st_size
    for _ in range(100):
        desk.flash(FlashSpec(query="Up?", max_tokens=3))  # as _opened registered it
    assert journal.path("desk").stat().st_size == size
    journal.close()


def test_a_rewrite_cut_short_by_a_crash_is_cleaned_up(tmp_path: Path) -> None:
    path = _write_one(tmp_path, [[5]])
    stray = path.with_name(path.name + ".new")
    stray.write_bytes(b"half a rewrite")
    (saved,) = _read(tmp_path)
    assert _entries(saved) == [(1, [5])] and not stray.exists()


def test_one_journal_folder_serves_one_daemon(tmp_path: Path) -> None:
    first = _journal(tmp_path)
    with pytest.raises(ConfigError, match=f"in use by another livelm daemon \\(pid {os.getpid()}\\)"):
        _journal(tmp_path)
    first.close()
    _journal(tmp_path).close()  # free again once the first let it go


def _post(url: str, path: str, body: dict) -> dict:
    reply = requests.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _ingested(url: str, sid: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = requests.get(f"{url}/v1/sessions/{sid}/stream/status", timeout=TIMEOUT).json()
        if status["ingested_seq"] == status["data_seq"] and not status["pending_tokens"]:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def test_sessions_come_back_after_the_daemon_is_killed(tmp_path: Path) -> None:
    args = ["--model", "demo", "--journal-dir", str(tmp_path / "journal")]
    ask = {"prompt": "What comes next?", "max_tokens": 8}
    with start_daemon(args, log_dir=tmp_path) as daemon:
        url = daemon.url
        _post(url, "/v1/sessions/init", {"session_id": "desk", "prompt": "Ticks.",
                                         "template": "raw", "window": 400,
                                         "flash": [{"query": "Up or down?", "max_tokens": 3}]})
        _post(url, "/v1/sessions/init", {"session_id": "gone", "template": "raw"})
        for burst in range(8):  # past the window: the oldest entries are dropped
            ticks = [f"tick {burst}.{i} price {100 + i} volume {i * 7}" for i in range(10)]
            _post(url, "/v1/sessions/desk/stream/push", {"data": ticks})
        _post(url, "/v1/sessions/gone/stream/push", {"data": ["x"]})
        requests.delete(f"{url}/v1/sessions/gone", timeout=TIMEOUT)
        before = _ingested(url, "desk")
        answer = _post(url, "/v1/sessions/desk/generate", ask)
        daemon.proc.kill()  # no drain: what was acknowledged must already be on disk
        daemon.proc.wait()
    assert before["dropped_entries"] > 0
    with start_daemon(args, log_dir=tmp_path) as daemon:
        url = daemon.url
        after = _ingested(url, "desk")
        for key in ("data_seq", "first_seq", "entries", "dropped_entries", "context_tokens",
                    "window", "template", "format"):
            assert after[key] == before[key], key
        again = _post(url, "/v1/sessions/desk/generate", ask)
        assert (again["text"], again["data_seq"]) == (answer["text"], answer["data_seq"])
        gone = requests.get(f"{url}/v1/sessions/gone/stream/status", timeout=TIMEOUT)
        assert gone.status_code == 404  # closed before the restart: not restored
        seq = _post(url, "/v1/sessions/desk/stream/push", {"data": ["tick 9"]})["seq"]
        assert seq == before["data_seq"] + 1  # seqs go on
        deadline = time.monotonic() + TIMEOUT
        while not (flash := requests.get(f"{url}/v1/sessions/desk/flash",
                                         timeout=TIMEOUT).json()["answers"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert flash[0]["query"] == "Up or down?"
        metrics = requests.get(f"{url}/metrics", timeout=TIMEOUT).text
        assert "livelm_journal_sessions_restored_total 1" in metrics
        # a dashboard resuming from an event id of the daemon before the restart is told what
        # it lost (event ids began again), then gets the new events
        with SseStream(daemon.port, "/v1/sessions/desk/events",
                       {"Last-Event-ID": "100000"}) as stream:
            lost = stream.next_event()
            assert lost is not None and lost.name == "events_lost", lost
            assert lost.data["requested"] == 100001 and lost.data["first_available"] <= lost.id + 1
            seq = _post(url, "/v1/sessions/desk/stream/push", {"data": ["tick 10"]})["seq"]
            update = stream.events_until(lambda e: e.data.get("data_seq") == seq)[-1]
            assert update.id > lost.id


def test_a_failed_write_ends_the_journal_not_the_session(tmp_path: Path) -> None:
    """A journal that cannot be written (here its file descriptor is gone, as a full disk
    would fail it) is dropped, file and all, and counted; the push itself succeeds."""
    model = loaded(ensure_demo_model(tmp_path / "demo"), tmp_path)

    async def scenario(engine: Engine):
        init = InitRequest(prompt="Feed.", template="raw", session_id="desk")
        await engine.init_session(init)
        path = engine.journal.path("desk")
        written = path.exists()
        os.close(engine.journal.sessions["desk"]._fd)  # the fault
        seq = (await engine.push("desk", ["tick 1"])).seq
        return written, path.exists(), seq, engine.counters["journal_errors_total"]

    written, still_there, seq, errors = run_engine(
        model, scenario, journal_dir=str(tmp_path / "journal")
    )
    assert written and not still_there
    assert (seq, errors) == (1, 1)
