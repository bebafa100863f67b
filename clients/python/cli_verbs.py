"""Runs a client verb of ``livelm``: connects the way the flags say, and turns every failure
into one line on stderr and an exit code.

Exit codes: 0 done, 1 the daemon refused or the connection broke, 2 bad usage or input,
3 the daemon cannot be reached, 130 interrupted, 141 the output was closed (``| head``: as a
process that SIGPIPE ends, quietly).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

from livelm.client.base import ClientBase
from livelm.client.errors import ConnectionLost, DaemonUnreachable, InvalidReply, UnknownErrorCode
from livelm.client.http import HttpClient
from livelm.client.tcp import connect_tcp
from livelm.client.ws import connect_ws
from livelm.protocol.errors import LiveLMError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_OUTPUT_CLOSED = 128 + 13  # what a shell reports for a process ended by SIGPIPE


class UsageError(Exception):
    """The command line or the input is wrong (exit 2)."""


Verb = Callable[[argparse.Namespace], Awaitable[int]]


def run_verb(name: str, args: argparse.Namespace) -> int:
    verb = _verbs()[name]
    try:
        return asyncio.run(verb(args))
    except UsageError as exc:
        return _fail(name, str(exc), EXIT_USAGE)
    except DaemonUnreachable as exc:
        return _fail(name, f"{exc} (is the daemon running?)", EXIT_UNREACHABLE)
    except LiveLMError as exc:
        return _fail(name, f"{exc.message} ({_code(exc)})", EXIT_FAILED)
    except (ConnectionLost, InvalidReply) as exc:
        return _fail(name, str(exc), EXIT_FAILED)
    except BrokenPipeError:
        return _output_closed()


async def open_client(args: argparse.Namespace) -> ClientBase:
    """A client over ``args.transport`` to the daemon at ``--host``/``--port``/``--tcp-port``."""
    if args.transport == "tcp":
        return await connect_tcp(args.host, args.tcp_port, api_key=args.api_key)
    url = http_url(args.host, args.port)
    if args.transport == "ws":
        return await connect_ws(url, api_key=args.api_key)
    return HttpClient(url, api_key=args.api_key)


def http_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _verbs() -> dict[str, Verb]:
    from livelm.client.cli_push import push
    from livelm.client.cli_query import query, status
    from livelm.client.cli_watch import watch

    return {"push": push, "query": query, "status": status, "watch": watch}


def _code(exc: LiveLMError) -> str:
    return exc.wire_code if isinstance(exc, UnknownErrorCode) else exc.code.value


def _output_closed() -> int:
    """The reader of stdout went away: nothing more to say, and nothing to say it to. stdout
    now writes to /dev/null, so that flushing it at exit raises no second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OUTPUT_CLOSED


def _fail(verb: str, message: str, code: int) -> int:
    print(f"livelm {verb}: error: {message}", file=sys.stderr)
    return code
