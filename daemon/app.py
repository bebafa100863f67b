"""Wires the daemon together: logs, HTTP server, kernels, model, engine, signals, drain.

Order: the HTTP server and the framed TCP server listen first (``/health`` answers at once,
``/ready`` is 503, TCP requests get ``overloaded``), the kernels are bound and the model loaded on
a background thread, then the engine starts and ``/ready`` turns 200 once the engine says it is
ready. SIGTERM or SIGINT drains: new requests get 503 (``overloaded`` on TCP/WebSocket), in-flight
queries finish (up to ``drain_timeout``), the servers close, exit 0. A second signal exits at once.
SIGHUP and SIGUSR1 are logged and ignored (there is no configuration reload): their default
action would end the daemon at once, without a drain, and with a status systemd does not restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import ipaddress
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import uvloop
from aiohttp import web

from livelm.daemon.config import Config, stray_env_vars
from livelm.daemon.engine.engine import Engine
from livelm.daemon.http.server import attach_engine, build_app, server_state, start_draining
from livelm.daemon.kernels.dispatcher import Binding
from livelm.daemon.kernels.startup import bind_and_load
from livelm.daemon.logs import ACCESS_LOGGER, AccessLogger, get_logger, setup_logging
from livelm.daemon.model.loader import LoadedModel
from livelm.daemon.service_notify import ServiceNotifier
from livelm.daemon.service_notify import current as current_notifier
from livelm.daemon.supervision import supervise
from livelm.daemon.transports.tcp import TcpServer
from livelm.protocol.errors import ConfigError, ModelLoadError

log = get_logger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_WORKER = 4  # the inference worker died while serving (systemd restarts the service)
EXIT_FORCED = 130  # a second SIGINT/SIGTERM during the drain

# logged and ignored: no configuration reload, and their default action ends the process at once
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
HANDLER_SHUTDOWN_SECONDS = 3.0  # after the engine stopped, the last handlers have this long
ENGINE_STOP_GRACE = 10.0  # on top of drain_timeout, in case the engine's stop itself hangs


class StartupError(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    # until the event loop's handlers take over (_install_signal_handlers), so that a SIGHUP
    # during the checks below does not end the daemon without a word either
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    setup_logging(config.log_level, config.log_format, syslog_prefix=config.log_syslog_prefix)
    faulthandler.enable(all_threads=True)  # a watchdog's SIGABRT leaves every thread's stack
    log.info("starting livelm", extra={"config": config.redacted(), "pid": os.getpid()})
    for var in stray_env_vars(os.environ):
        log.warning("ignoring environment variable %s", var)
    warn_if_open(config)
    try:  # device, dtype and paths are checked here, before anything listens
        config.torch_device()
        config.torch_dtype()
        config.check_paths()
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    try:
        return uvloop.run(_serve(config))
    except StartupError as exc:
        log.error("%s", exc, extra={"exit_code": exc.exit_code})
        return exc.exit_code
    except Exception:
        log.exception("fatal error")
        return EXIT_ERROR


def warn_if_open(config: Config) -> None:
    """A WARNING when other machines may reach the daemon and no API key is asked of them."""
    if config.api_keys or is_loopback(config.host):
        return
    log.warning(
        "listening on %s without api_keys: anyone who can reach this address may use the "
        "daemon; set LIVELM_API_KEYS (or api_keys) or listen on 127.0.0.1",
        config.host,
        extra={"host": config.host},
    )


def is_loopback(host: str) -> bool:
    """Only ``localhost`` and loopback addresses count; any other name may resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _serve(config: Config) -> int:
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    notifier = current_notifier()
    app = build_app(None, config)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=get_logger(ACCESS_LOGGER),
        handler_cancellation=True,  # a vanished client cancels its query
        shutdown_timeout=HANDLER_SHUTDOWN_SECONDS,
    )
    await runner.setup()
    tcp = TcpServer(server_state(app))
    engine: Engine | None = None
    try:
        site = await _listen(runner, config)
        tcp_addresses = await _listen_tcp(tcp, config)
        notifier.status(f"loading {config.model}")
        engine = await _start_engine(app, config, stop)
        if engine is not None:
            status = _serving_status(server_state(app).model, runner, tcp_addresses)
            await _serve_until_stopped(engine, notifier, stop, status)
        log.info("draining", extra={"drain_timeout": config.drain_timeout})
        notifier.stopping("draining")
        start_draining(app)
        await site.stop()  # no new connections
        tcp.stop_listening()
        if engine is not None:
            await _stop_engine(engine, config.drain_timeout)
    finally:
        await tcp.close(HANDLER_SHUTDOWN_SECONDS)
        await runner.cleanup()
    log.info("stopped")
    return EXIT_WORKER if engine is not None and engine.worker_failed else EXIT_OK


async def _serve_until_stopped(
    engine: Engine, notifier: ServiceNotifier, stop: asyncio.Event, status: str
) -> None:
    """Tells systemd the service is ready, then watches the worker until a signal (or its
    death) sets ``stop``."""
    notifier.ready(status)
    watcher = asyncio.ensure_future(supervise(engine, notifier, stop))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _serving_status(
    model: str, runner: web.AppRunner, tcp_addresses: list[tuple[str, int]]
) -> str:
    http = ", ".join(f"http://{host}:{port}" for host, port, *_ in runner.addresses)
    framed = ", ".join(f"tcp://{host}:{port}" for host, port in tcp_addresses)
    return f"serving {model} on {http} and {framed}"


async def _listen(runner: web.AppRunner, config: Config) -> web.TCPSite:
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(
            EXIT_CONFIG, f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from exc
    for host, port, *_ in runner.addresses:
        log.info("listening on http://%s:%s", host, port, extra={"host": host, "port": port})
    return site


async def _listen_tcp(tcp: TcpServer, config: Config) -> list[tuple[str, int]]:
    try:
        addresses = await tcp.start(config.host, config.tcp_port)
    except OSError as exc:
        raise StartupError(
            EXIT_CONFIG,
            f"cannot listen on {config.host}:{config.tcp_port} (tcp_port): {exc.strerror or exc}",
        ) from exc
    for host, port in addresses:
        log.info("listening on tcp://%s:%s", host, port, extra={"host": host, "tcp_port": port})
    return addresses


async def _start_engine(
    app: web.Application, config: Config, stop: asyncio.Event
) -> Engine | None:
    """Load off the loop thread and start the engine; ``None`` if a signal came first."""
    loop = asyncio.get_running_loop()
    loading = _in_thread(lambda: _load(config, loop), name="livelm-load")
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not loading.done():
        log.warning("stopped while the model was loading")
        return None
    loaded = _loaded(loading)
    try:
        loaded.engine.start()
    except Exception as exc:
        log.exception("the engine failed to start")
        raise StartupError(EXIT_MODEL, f"the engine failed to start: {exc}") from exc
    await loaded.engine.restore_sessions()  # before /ready: clients find their sessions back
    name = loaded.model.name
    attach_engine(app, loaded.engine, model=name, kernels=loaded.binding.chosen())
    log.info("engine started", extra={"model": name, "device": str(loaded.model.decoder.device)})
    return loaded.engine


@dataclass(frozen=True)
class Loaded:
    binding: Binding
    model: LoadedModel
    engine: Engine


def _load(config: Config, loop: asyncio.AbstractEventLoop) -> Loaded:
    """Bind kernels, load the model, build the engine (its KV pool allocation is slow too)."""
    binding, model = bind_and_load(config)
    log.info("model loaded", extra={"model": model.name, "dtype": str(model.decoder.dtype)})
    return Loaded(binding, model, Engine(model, config, loop))


def _loaded(loading: asyncio.Future[Loaded]) -> Loaded:
    """The load's result, or a StartupError with the exit code that fits its failure."""
    try:
        return loading.result()
    except ConfigError as exc:
        raise StartupError(EXIT_CONFIG, f"invalid configuration: {exc}") from exc
    except ModelLoadError as exc:
        raise StartupError(EXIT_MODEL, f"cannot load model: {exc}") from exc
    except Exception as exc:
        log.exception("unexpected error while loading the model")
        raise StartupError(EXIT_MODEL, f"cannot load model: {exc!r}") from exc


async def _stop_engine(engine: Engine, drain_timeout: float) -> None:
    try:
        await asyncio.wait_for(engine.stop(drain_timeout), drain_timeout + ENGINE_STOP_GRACE)
    except asyncio.TimeoutError:
        log.error("the engine did not stop within %.1fs; exiting anyway", drain_timeout)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        log.info("%s received, shutting down", signal.Signals(signum).name)
        stop.set()

    def on_ignored(signum: int) -> None:
        log.warning(
            "%s received and ignored: livelm does not reload its configuration; restart it "
            "to apply changes",
            signal.Signals(signum).name,
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    for signum in IGNORED_SIGNALS:
        loop.add_signal_handler(signum, on_ignored, signum)


def _in_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` on a daemon thread (a load still running never blocks the exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: Exception | None) -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(result)  # type: ignore[arg-type]
        else:
            future.set_exception(exc)

    def work() -> None:
        try:
            result, error = fn(), None
        except Exception as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            log.debug("the event loop closed before %s finished", name)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
