"""The requests whose replies keep coming: a query's tokens, a subscription's events.

Each runs as a task of its own, so one connection can multiplex many; ``send`` writes one
message in the encoding of the request that started the stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from livelm.daemon.logs import get_logger
from livelm.protocol.errors import InternalError, LiveLMError
from livelm.protocol.wire import (
    EVENT_MESSAGES,
    DoneMsg,
    GenerateMsg,
    ServerMessage,
    SubscribeMsg,
    TokenMsg,
    UnsubscribedMsg,
    error_msg,
    reply,
)

if TYPE_CHECKING:
    from livelm.daemon.engine.events import Subscription
    from livelm.daemon.engine.query import QueryHandle

log = get_logger(__name__)

Send = Callable[[ServerMessage], Awaitable[None]]


async def stream_answer(handle: QueryHandle, msg: GenerateMsg, send: Send) -> None:
    """``token`` messages (when ``msg.stream``), then ``done``, or an ``error`` with the id.

    Cancelling the task (the client went away) cancels the query in the engine.
    """
    try:
        if msg.stream:
            async for event in handle:
                await send(TokenMsg(id=msg.id, text=event.text, token=event.token))
        done = await handle.result()
    except LiveLMError as exc:
        await send(error_msg(exc, msg.id))
    except Exception:
        log.exception("query stream failed", extra={"request_id": msg.id})
        await send(error_msg(InternalError("the query failed; see the daemon log"), msg.id))
    else:
        await send(reply(DoneMsg, done, id=msg.id))
    finally:
        handle.cancel()  # a no-op once the query finished


async def stream_events(subscription: Subscription, msg: SubscribeMsg, send: Send) -> None:
    """A session's events as messages, each with the subscribe's id, until the session closes
    or the daemon shuts down (then ``unsubscribed`` says which), or the task is cancelled (the
    client went away, or unsubscribed)."""
    try:
        async for event in subscription:
            await send(reply(EVENT_MESSAGES[event.name], event.body, event_id=event.id, id=msg.id))
        reason = subscription.end_reason
        await send(UnsubscribedMsg(id=msg.id, session_id=msg.session_id, reason=reason))
    finally:
        subscription.close()
