"""A session's entries on disk, so sessions survive a restart.

Entries are the source of truth and the KV cache is derived from them: with ``journal_dir`` set,
each session appends what it accepts to ``<dir>/<session_id>.journal`` (its opening, its flash
queries, each push's tokens, each window trim), and the next start re-opens every journaled
session with the same id, seqs and window and re-ingests its retained entries. A closed session's
file is deleted.

A file is a sequence of frames, each a 4-byte little-endian length, the payload's CRC-32 and a
MessagePack record. Every frame goes to the OS in one unbuffered write, so a killed process
loses nothing it had acknowledged (a power loss may lose the last writes: the OS had not flushed
them). A torn last frame is ignored when read back; damage anywhere else sets the file aside.
Trims make a file grow past what a session retains; once the dropped entries outnumber the
retained ones the file is rewritten with the retained ones only (written aside, then renamed
over it).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import struct
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from livelm.protocol.errors import ConfigError
from livelm.protocol.messages import FlashSpec, InitRequest

log = logging.getLogger("livelm.journal")

SUFFIX = ".journal"
NEW = ".new"  # a rewrite in progress; left behind only by a crash before its rename
FAILED = ".failed"
_PREFIX = struct.Struct("<II")  # payload length, its CRC-32
COMPACT_MIN_DROPPED = 256  # dropped entries before a rewrite is worth it


class Header(msgspec.Struct, tag="header"):
    model: str  # the spec it was written under, for messages
    tokenizer: str  # the tokenizer's fingerprint: the tokens mean the same under it
    vocab_size: int
    init: InitRequest  # as opened, its window resolved


class Flash(msgspec.Struct, tag="flash"):
    spec: FlashSpec


class Push(msgspec.Struct, tag="push"):
    first_seq: int
    tokens: list[bytes]  # per entry, int32 token ids


class Trim(msgspec.Struct, tag="trim"):
    first_kept: int


Record = Header | Flash | Push | Trim
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


class JournalError(Exception):
    """A journal could not be written (the session goes on without one) or read."""


@dataclass
class Saved:
    """A session as its journal left it."""

    header: Header
    path: Path | None = None  # the file it was read from
    flash: list[FlashSpec] = field(default_factory=list)
    # (seq, token ids): 4 bytes a token, where a list of ints would take 36
    entries: deque[tuple[int, array]] = field(default_factory=deque)
    first_kept: int = 1

    @property
    def session_id(self) -> str:
        return self.header.init.session_id or ""

    @property
    def last_seq(self) -> int:
        return self.entries[-1][0] if self.entries else self.first_kept - 1

    def add_flash(self, spec: FlashSpec) -> bool:
        """False when it is kept already (registered again, on a reconnect)."""
        if spec in self.flash:
            return False
        self.flash.append(spec)
        return True

    def trim(self, first_kept: int) -> int:
        """Drops the entries before ``first_kept``; returns how many went."""
        self.first_kept = max(self.first_kept, first_kept)
        dropped = 0
        while self.entries and self.entries[0][0] < self.first_kept:
            self.entries.popleft()
            dropped += 1
        return dropped


def frame(record: Record) -> bytes:
    payload = _encoder.encode(record)
    return _PREFIX.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(path: Path) -> list[Record]:
    """The file's records. Only the last frame may be torn (a crash mid-write): it is left
    out. A damaged frame with more after it is corruption, and a JournalError."""
    data = path.read_bytes()
    records: list[Record] = []
    at = 0
    while at + _PREFIX.size <= len(data):
        size, crc = _PREFIX.unpack_from(data, at)
        end = at + _PREFIX.size + size
        if end > len(data):
            break  # the length runs past the end: the last write was cut short
        payload = data[at + _PREFIX.size:end]
        try:
            if zlib.crc32(payload) != crc:
                raise JournalError("checksum mismatch")
            records.append(_decoder.decode(payload))
        except (JournalError, msgspec.DecodeError) as exc:
            if end < len(data):
                raise JournalError(f"damaged at byte {at} of {len(data)}: {exc}") from exc
            break  # the last frame is damaged: cut short too
        at = end
    if at < len(data):
        log.warning("journal %s: ignored %d bytes of a torn last write", path.name,
                    len(data) - at, extra={"journal": str(path)})
    return records


def replay(records: list[Record]) -> Saved:
    """What a session's records leave retained; a JournalError if they do not hold together
    (seqs that do not follow on, token ids outside the vocabulary)."""
    if not records or not isinstance(records[0], Header):
        raise JournalError("it does not start with a header")
    saved = Saved(records[0])
    for record in records[1:]:
        if isinstance(record, Flash):
            saved.add_flash(record.spec)
        elif isinstance(record, Push):
            if record.first_seq != saved.last_seq + 1:
                raise JournalError(f"seq {record.first_seq} follows seq {saved.last_seq}")
            for i, raw in enumerate(record.tokens):
                saved.entries.append((record.first_seq + i, _token_ids(raw, saved.header)))
        elif isinstance(record, Trim):
            saved.trim(record.first_kept)
        else:
            raise JournalError("a second header")
    return saved


def _token_ids(raw: bytes, header: Header) -> array:
    if len(raw) % 4:
        raise JournalError("an entry's token ids are cut short")
    ids = array("i", raw)
    if ids and not (0 <= min(ids) and max(ids) < header.vocab_size):
        raise JournalError(f"a token id outside the vocabulary of {header.vocab_size}")
    return ids


class SessionJournal:
    """One open session's file, appended to as the session accepts data."""

    def __init__(self, path: Path, saved: Saved) -> None:
        self.path = path
        self.saved = saved  # kept in step with the file: what a rewrite writes
        self.dropped_since_rewrite = 0
        self._fd = -1
        self.rewrite()

    def flash(self, spec: FlashSpec) -> None:
        if self.saved.add_flash(spec):
            self._append(frame(Flash(spec)))

    def push(self, first_seq: int, tokens: list[list[int]], first_kept: int | None) -> None:
        """A push's entries, then the trim it caused (which may drop some of them too)."""
        ids = [array("i", t) for t in tokens]
        out = frame(Push(first_seq, [a.tobytes() for a in ids]))
        self.saved.entries.extend((first_seq + i, a) for i, a in enumerate(ids))
        if first_kept is not None:
            out += frame(Trim(first_kept))
            self.dropped_since_rewrite += self.saved.trim(first_kept)
        self._append(out)
        if self.dropped_since_rewrite > max(COMPACT_MIN_DROPPED, len(self.saved.entries)):
            self.rewrite()

    def rewrite(self) -> None:
        """The file anew, with only what is retained (written aside, then renamed over it)."""
        saved = self.saved
        records: list[Record] = [saved.header, *(Flash(s) for s in saved.flash)]
        if saved.first_kept > 1:  # first: the entries then follow on from it
            records.append(Trim(saved.first_kept))
        if saved.entries:
            first = saved.entries[0][0]
            records.append(Push(first, [t.tobytes() for _, t in saved.entries]))
        aside = self.path.with_name(self.path.name + NEW)
        try:
            _write_synced(aside, b"".join(frame(r) for r in records))
            os.replace(aside, self.path)
            _sync_folder(self.path.parent)  # the rename itself survives a power loss
            self.close()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise JournalError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.dropped_since_rewrite = 0

    def _append(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise JournalError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        if written != len(data):  # a full disk: the file now ends in a torn frame
            raise JournalError(f"cannot write {self.path}: short write ({written} of {len(data)})")

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as exc:  # what was written is in the file already; nothing to redo
            log.warning("closing journal %s: %s", self.path.name, exc.strerror or exc)


class Journal:
    """The journal folder: its sessions' files, and what they hold at start-up."""

    def __init__(self, folder: Path, model: str, tokenizer: str, vocab_size: int) -> None:
        """``tokenizer``: a fingerprint of the tokenizer (token ids mean the same under it)."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)  # checked writable at start-up (check_paths)
        self._lock_fd = _lock(folder)
        self.model, self.tokenizer, self.vocab_size = model, tokenizer, vocab_size
        self.sessions: dict[str, SessionJournal] = {}

    def path(self, session_id: str) -> Path:
        return self.folder / f"{session_id}{SUFFIX}"

    def header(self, init: InitRequest) -> Header:
        return Header(self.model, self.tokenizer, self.vocab_size, init)

    def saved(self) -> list[Saved]:
        """Every journaled session this daemon can restore; the others are renamed aside
        (``.failed``) with a warning saying why. Rewrites a crash cut short are removed (the
        file they were to replace is still whole)."""
        for stale in self.folder.glob(f"*{SUFFIX}{NEW}"):
            stale.unlink(missing_ok=True)
        found = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                saved = replay(read_records(path))
                self._check_header(saved.header, path)
            except (OSError, JournalError) as exc:
                self.set_aside(path, str(exc))
                continue
            saved.path = path
            found.append(saved)
        return found

    def _check_header(self, header: Header, path: Path) -> None:
        if header.tokenizer != self.tokenizer or header.vocab_size != self.vocab_size:
            raise JournalError(
                f"it was written with another tokenizer (model {header.model!r}); this daemon "
                f"serves {self.model!r}"
            )
        if path.name != f"{header.init.session_id}{SUFFIX}":
            raise JournalError(f"it holds session {header.init.session_id!r}, not its name's")

    def set_aside(self, path: Path, why: str) -> None:
        """Renames a file that cannot be restored to a ``.failed`` name no other file has,
        so nothing set aside earlier is overwritten. Renaming it back to ``.journal`` (once
        its cause is fixed) restores it at the next start."""
        for n in itertools.count():
            target = path.with_name(path.name + FAILED + (f".{n}" if n else ""))
            if not target.exists():
                break
        log.warning("journal %s not restored: %s; renamed to %s", path.name, why, target.name,
                    extra={"journal": str(path)})
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("cannot rename journal %s: %s", path, exc)

    def open(self, saved: Saved) -> SessionJournal:
        journal = SessionJournal(self.path(saved.session_id), saved)
        self.sessions[saved.session_id] = journal
        return journal

    def drop(self, session_id: str, *, delete: bool) -> None:
        """Stop journaling a session; ``delete`` removes its file (the session was closed)."""
        journal = self.sessions.pop(session_id, None)
        if journal is None:
            return
        journal.close()
        if delete:
            journal.path.unlink(missing_ok=True)

    def close(self) -> None:
        """At shutdown: the files stay for the next start, and the folder is let go."""
        for journal in self.sessions.values():
            journal.close()
        self.sessions.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(folder: Path) -> int:
    """An exclusive lock on the folder for this process's life (the OS drops it when the
    process dies): two daemons appending to the same files would corrupt them."""
    path = folder / "LOCK"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"journal_dir: {str(folder)!r} is in use by another livelm daemon (pid {holder}); "
            "each daemon needs a journal_dir of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
