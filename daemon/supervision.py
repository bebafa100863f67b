"""Watches the worker thread from the event loop.

While the worker turns over (a turn is one step, or an idle wait of at most a quarter second),
the loop pings systemd's watchdog; a worker stuck in one turn stops the pings, so systemd kills
and restarts the daemon. A worker that died stops the daemon (exit code 4): its sessions' KV
state is gone, and a restart serves again where a process without a worker could not.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Protocol

from livelm.daemon.service_notify import ServiceNotifier

log = logging.getLogger("livelm.supervision")

CHECK_EVERY_S = 1.0
STALL_LOG_S = 30.0  # without a watchdog, a turn this long is still logged


class WorkerProbe(Protocol):
    """What the supervisor reads of the engine."""

    @property
    def worker_failed(self) -> bool: ...

    def worker_turn_age(self) -> float: ...


class Verdict(enum.Enum):
    HEALTHY = "healthy"
    STALLED = "stalled"
    FAILED = "failed"


@dataclass
class WorkerWatch:
    """The verdict on each check, logging a stall when it starts and when it ends."""

    stall_after: float
    stalled: bool = False

    def check(self, failed: bool, turn_age: float) -> Verdict:
        if failed:
            return Verdict.FAILED
        if turn_age > self.stall_after:
            if not self.stalled:
                log.error(
                    "the worker has been in one step for %.1fs", turn_age,
                    extra={"turn_seconds": round(turn_age, 3)},
                )
            self.stalled = True
            return Verdict.STALLED
        if self.stalled:
            log.warning("the worker is turning over again")
            self.stalled = False
        return Verdict.HEALTHY


def watch_for(notifier: ServiceNotifier) -> tuple[WorkerWatch, float]:
    """The watch and the check interval: with a watchdog, pings stop once the worker has been
    stuck for half its timeout, so systemd acts within about 1.5 timeouts of a stall."""
    timeout = notifier.watchdog_seconds
    if timeout is None:
        return WorkerWatch(stall_after=STALL_LOG_S), CHECK_EVERY_S
    return WorkerWatch(stall_after=timeout / 2), min(CHECK_EVERY_S, timeout / 4)


async def supervise(engine: WorkerProbe, notifier: ServiceNotifier, stop: asyncio.Event) -> None:
    """Until cancelled, or until the worker dies, which sets ``stop``."""
    watch, interval = watch_for(notifier)
    while True:
        verdict = watch.check(engine.worker_failed, engine.worker_turn_age())
        if verdict is Verdict.FAILED:
            log.critical("the inference worker died; stopping the daemon")
            notifier.status("the inference worker died; stopping")
            stop.set()
            return
        if verdict is Verdict.HEALTHY:
            notifier.watchdog()
        await asyncio.sleep(interval)
