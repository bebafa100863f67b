"""systemd's service notifications (the sd_notify protocol), without libsystemd.

Under ``Type=notify`` systemd hands the service a datagram socket in ``NOTIFY_SOCKET`` and
waits for ``READY=1`` before it counts the service as started; ``WatchdogSec=`` adds
``WATCHDOG_USEC``, and a service that sends no ``WATCHDOG=1`` for that long is killed (and, with
``Restart=on-failure``, restarted). Outside systemd the variables are absent and every call here
does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("livelm.service")


class ServiceNotifier:
    """Sends state lines to the service manager's notification socket, if there is one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec if self.address is not None else None
        self._failed_once = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> ServiceNotifier:
        """The notifier systemd's variables describe for the process ``pid``."""
        return cls(environ.get("NOTIFY_SOCKET") or None, _watchdog_usec(environ, pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_seconds(self) -> float | None:
        """How long systemd waits for a watchdog ping before it kills the service."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 1e6

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, *fields: str) -> None:
        """One datagram of newline-separated ``KEY=VALUE`` fields. A failed send is logged (once)
        and not raised: the service keeps serving whatever its manager's socket does."""
        if self.address is None:
            return
        message = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed_once:
                self._failed_once = True
                log.warning("cannot notify the service manager at %r: %s", self.address, exc)


def _socket_address(value: str) -> str | bytes:
    """A leading ``@`` names a socket in the abstract namespace (a NUL byte on the wire)."""
    return b"\0" + value[1:].encode() if value.startswith("@") else value


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None  # the watchdog belongs to another process of the unit
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", raw)
        return None
    return usec


def current() -> ServiceNotifier:
    """The notifier for this process, from its environment."""
    return ServiceNotifier.from_environ(os.environ, os.getpid())
