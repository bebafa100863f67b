"""The requests that get exactly one reply: each is one engine call and one reply message.

State changes (init, push, flash, close) are shielded: once started they complete or fail as a
whole even if the connection goes away, so an entry is either acknowledged and kept, or never
acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from livelm.protocol.messages import FlashSpec, InitRequest
from livelm.protocol.wire import (
    AckMsg,
    ClosedMsg,
    CloseMsg,
    FlashMsg,
    FlashRegisteredMsg,
    InitMsg,
    PushMsg,
    SessionMsg,
    StatusMsg,
    StatusReplyMsg,
    as_request,
    reply,
)

if TYPE_CHECKING:
    from livelm.daemon.engine.engine import Engine


class Requests:
    """``engine_for()`` gives the running engine or raises ``Overloaded`` (loading, draining)."""

    def __init__(self, engine_for: Callable[[], Engine]) -> None:
        self.engine_for = engine_for

    async def init(self, msg: InitMsg) -> SessionMsg:
        engine = self.engine_for()
        created = await asyncio.shield(engine.init_session(as_request(msg, InitRequest)))
        return reply(SessionMsg, created, id=msg.id)

    async def push(self, msg: PushMsg) -> AckMsg:
        engine = self.engine_for()
        pushed = await asyncio.shield(engine.push(msg.session_id, msg.data))
        return AckMsg(
            session_id=pushed.session_id, seq=pushed.seq, accepted=pushed.accepted, id=msg.id
        )

    async def flash(self, msg: FlashMsg) -> FlashRegisteredMsg:
        engine = self.engine_for()
        spec = as_request(msg, FlashSpec)
        registered = await asyncio.shield(engine.register_flash(msg.session_id, spec))
        return reply(FlashRegisteredMsg, registered, id=msg.id)

    async def status(self, msg: StatusMsg) -> StatusReplyMsg:
        return reply(StatusReplyMsg, self.engine_for().status(msg.session_id), id=msg.id)

    async def close(self, msg: CloseMsg) -> ClosedMsg:
        engine = self.engine_for()
        await asyncio.shield(engine.close_session(msg.session_id))
        return ClosedMsg(id=msg.id, session_id=msg.session_id)
