"""Python clients for LiveLM (TCP, WebSocket, HTTP/SSE), async and blocking.

    from livelm.client import connect_tcp

    async with await connect_tcp("127.0.0.1", 8081) as client:
        session = await client.init("You watch a market feed.", format="ohlcv")
        await client.push(session.session_id, [{"t": "09:30", "o": 1, "h": 2, "l": 1, "c": 2, "v": 5}])
        print((await client.generate(session.session_id, "Up or down?")).text)

Every client has the same operations (``ClientBase``); errors from the daemon raise the typed
exceptions of ``livelm.protocol.errors`` (``UnknownSession``, ``Overloaded``, ...).
"""

from livelm.client.base import ClientBase, EventStream, TokenStream
from livelm.client.errors import (  # the daemon's typed errors and the client's own
    BadFrame,
    ConnectionLost,
    ContextFull,
    DaemonUnreachable,
    InternalError,
    InvalidReply,
    InvalidRequest,
    LiveLMError,
    Overloaded,
    TooLarge,
    Unauthorized,
    UnknownErrorCode,
    UnknownSession,
)
from livelm.client.http import HttpClient
from livelm.client.message_client import MessageClient
from livelm.client.replies import (
    DataUpdated,
    DoneReply,
    Event,
    EventsLost,
    FlashAnswer,
    SessionInfo,
    Status,
    Welcome,
)
from livelm.client.sync import SyncClient
from livelm.client.tcp import connect_tcp
from livelm.client.ws import connect_ws

__all__ = [
    "BadFrame",
    "ClientBase",
    "ConnectionLost",
    "ContextFull",
    "DaemonUnreachable",
    "DataUpdated",
    "DoneReply",
    "Event",
    "EventStream",
    "EventsLost",
    "FlashAnswer",
    "HttpClient",
    "InternalError",
    "InvalidReply",
    "InvalidRequest",
    "LiveLMError",
    "MessageClient",
    "Overloaded",
    "SessionInfo",
    "Status",
    "SyncClient",
    "TokenStream",
    "TooLarge",
    "Unauthorized",
    "UnknownErrorCode",
    "UnknownSession",
    "Welcome",
    "connect_tcp",
    "connect_ws",
]
