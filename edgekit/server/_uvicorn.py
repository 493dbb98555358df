"""Running the app under uvicorn on a socket edgekit bound itself, with edgekit's shutdown behaviour.

Two differences from ``uvicorn.run``: the socket is bound by ``edgekit.server.bind`` first (so a busy port
is a one-line error instead of uvicorn's ``sys.exit``), and SIGTERM/SIGINT first tell the app to drain
(refuse new work, cut the running generation after the grace period) and then return normally instead of
re-raising the signal once uvicorn has stopped (uvicorn's default), so the CLI can report and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None], on_listening: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal
        self._on_listening = on_listening
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            self._on_listening()

    def handle_exit(self, sig, frame) -> None:
        # Runs in the signal handler: hand the drain to the loop instead of touching its futures here.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_signal)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(app, sock: socket.socket, *, host: str, log_level: str, shutdown_timeout: float,
               on_signal: Callable[[], None], on_listening: Callable[[], None], server_ref: list) -> None:
    """Serve ``app`` on ``sock`` until a signal (or ``server_ref[0].should_exit``); blocks."""
    config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], log_level=log_level, lifespan="on",
                            # uvicorn's own deadline is a backstop behind the app's grace period
                            timeout_graceful_shutdown=shutdown_timeout + 5, server_header=False)
    server = _Server(config, on_signal, on_listening)
    server_ref.append(server)
    server.run(sockets=[sock])
