"""The client over a message channel (TCP or WebSocket): hello/welcome, then one reader task
that dispatches every incoming message by request id, so many requests share the connection.

If the connection ends, every pending request fails with ``ConnectionLost`` naming the reason,
and so does every later call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

from livelm import __version__
from livelm.client.base import ClientBase
from livelm.client.channel import Channel
from livelm.client.errors import (
    ConnectionLost,
    DaemonUnreachable,
    InvalidReply,
    error_from_message,
)
from livelm.client.replies import Welcome, decode_reply
from livelm.client.route_streams import AnswerReplies, SubscriptionEvents
from livelm.client.router import RequestRouter, Route

PROTOCOL_VERSION = 1
CLIENT_NAME = f"livelm-python/{__version__}"


class MessageClient(ClientBase):
    def __init__(self, channel: Channel, welcome: Welcome) -> None:
        self.channel = channel
        self.welcome = welcome
        self._router = RequestRouter()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def start(
        cls, channel: Channel, *, api_key: str | None = None, timeout: float = 10.0
    ) -> MessageClient:
        """Says hello on ``channel`` and returns the client once the daemon welcomed it.

        A peer that does not answer with a welcome is no LiveLM daemon (a hung one, or another
        service on that port): ``DaemonUnreachable``, as when nothing listens there."""
        try:
            welcome = await asyncio.wait_for(_handshake(channel, api_key), timeout)
        except asyncio.TimeoutError as exc:
            await channel.close()
            raise DaemonUnreachable(
                f"cannot connect to the daemon at {channel.description}: no welcome in {timeout}s"
            ) from exc
        except (ConnectionLost, InvalidReply) as exc:
            await channel.close()
            raise DaemonUnreachable(
                f"cannot connect to the daemon at {channel.description}: the handshake failed: "
                f"{exc}"
            ) from exc
        except BaseException:
            await channel.close()
            raise
        channel.set_max_frame(welcome.max_frame)
        return cls(channel, welcome)

    @property
    def connected(self) -> bool:
        return self._router.failure is None

    async def aclose(self) -> None:
        self._router.fail_all(ConnectionLost(f"the client closed its connection to {self.where}"))
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.channel.close()

    @property
    def where(self) -> str:
        return self.channel.description

    # ---- transport primitives ------------------------------------------------------------------
    async def _request(
        self, op: str, session_id: str | None, fields: dict[str, Any]
    ) -> dict[str, Any]:
        route = await self._send(op, session_id, fields)
        try:
            reply = await route.next()
            while op == "generate" and reply.get("type") == "token":
                reply = await route.next()  # a daemon may stream even when not asked to
            return reply
        finally:
            route.close()

    def _request_stream(self, op: str, session_id: str, fields: dict[str, Any]) -> AnswerReplies:
        return AnswerReplies(lambda: self._send(op, session_id, fields))

    def _events(
        self, session_id: str, events: list[str] | None, last_event_id: int | None
    ) -> SubscriptionEvents:
        fields: dict[str, Any] = {} if events is None else {"events": events}
        if last_event_id is not None:
            fields["last_event_id"] = last_event_id

        def subscribe() -> Awaitable[Route]:
            return self._send("subscribe", session_id, fields, subscribe_to=session_id)

        return SubscriptionEvents(subscribe, self._unsubscribe, events, self.where)

    async def _unsubscribe(self, route: Route) -> None:
        """Asks the daemon to end the subscription made by the request of ``route``."""
        if self._router.failure is not None:
            raise self._router.failure
        await self.channel.send({"type": "unsubscribe", "id": route.id})

    async def _send(
        self,
        op: str,
        session_id: str | None,
        fields: dict[str, Any],
        *,
        subscribe_to: str | None = None,
    ) -> Route:
        route = self._router.open(subscribe_to)
        message = {"type": op, "id": route.id, **fields}
        if session_id is not None:
            message["session_id"] = session_id
        try:
            await self.channel.send(message)
        except BaseException:
            route.close()
            raise
        return route

    async def _read_loop(self) -> None:
        reason = ConnectionLost(f"the reader of {self.where} stopped")
        try:
            while True:
                self._router.dispatch(await self.channel.receive())
        except (ConnectionLost, InvalidReply) as exc:
            reason = self._lost(exc)
        finally:  # also on cancellation or a bug: nobody may wait forever
            self._router.fail_all(reason)

    def _lost(self, exc: Exception) -> ConnectionLost:
        last = self._router.last_error
        if last is None:
            return ConnectionLost(str(exc))
        code, message = last.get("code"), last.get("message")
        return ConnectionLost(f"{exc} after the error {code}: {message}")


async def _handshake(channel: Channel, api_key: str | None) -> Welcome:
    hello: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION, "client": CLIENT_NAME}
    if api_key is not None:
        hello["api_key"] = api_key
    await channel.send(hello)
    reply = await channel.receive()
    if reply.get("type") == "error":
        raise error_from_message(reply)
    if reply.get("type") != "welcome":
        raise InvalidReply(f"expected 'welcome' from {channel.description}, got {reply!r:.200}")
    return decode_reply(reply, Welcome)
