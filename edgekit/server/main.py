"""``serve()``: one bundle served on a port until SIGTERM/SIGINT, and the checks before the port opens.

Only the standard library at import: starlette and uvicorn (the ``serve`` extra) are imported when a server
is started, after :func:`require_extra` has said which of them is missing.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

from ..errors import UserInputError


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to a public address


def require_extra() -> None:
    """Raise a one-line error when starlette/uvicorn are missing (the ``serve`` extra)."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserInputError(f"edgekit serve needs {' and '.join(missing)}, which are not installed: "
                             "pip install 'edgekit[serve]'")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free port), or a one-line UserInputError."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise UserInputError(f"invalid port {port!r}: use 1..65535 (or 0 for any free port)")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserInputError(f"cannot listen on host {host!r} ({e.strerror}): give an address of this machine, "
                             "e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port, or stop the "
                             "program that uses it") from None
    sock.setblocking(False)
    return sock


def url_for(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          max_queue: int = 8, max_context: int | None = None, memory_budget: int | str | None = None,
          threads: int | None = None, backend: str = "auto", model_name: str | None = None,
          thinking_budget: int | None = None, tool_choice: str = "auto", shutdown_timeout: float = 10.0,
          log_level: str = "info",
          max_body_bytes: int | None = None, prefix_reuse: bool = True, speculative=None,
          on_listening: Callable[[str], None] | None = None,
          on_ready: Callable[[str, str, int], None] | None = None) -> None:
    """Serve ``bundle`` on host:port until SIGTERM or SIGINT, then stop gracefully.

    The port opens first (``/health`` answers 503 "loading"), then the model loads on a thread; once it is
    loaded ``on_ready(url, model_id, max_context)`` runs and requests are served. ``on_listening(url)`` runs
    when the port is open (with port 0, the URL carries the port chosen). On SIGTERM/SIGINT the server stops
    accepting, refuses waiting requests (503), lets the running generation finish for ``shutdown_timeout``
    seconds, cancels it after that, and returns. ``thinking_budget`` caps R1's thought for requests that do
    not send their own; ``tool_choice`` is the choice for requests with tools and none of their own.
    ``prefix_reuse`` keeps the KV rows a request shares with the previous one (see ``edgekit.runtime.load``), as does
    ``speculative`` (off by default).
    ``max_body_bytes`` caps a request body (413 beyond; default 8 MiB). Load errors (BundleError,
    BudgetExceeded, ...) are raised after the port is closed again.
    """
    require_extra()
    if not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
        raise UserInputError(f"invalid shutdown_timeout {shutdown_timeout!r}: use seconds >= 0")
    from ..runtime.bundle import read_manifest
    from ..runtime.model import load

    read_manifest(bundle)  # a wrong path fails here, before a port is opened
    model_id = model_name or Path(bundle).resolve().name

    from .app import create_app

    max_body_bytes = _body_limit(max_body_bytes)
    sock = bind(host, port)
    url = url_for(host, sock.getsockname()[1])
    failure: list[BaseException] = []
    server_ref: list = []

    def load_model():
        return load(bundle, max_context=max_context, memory_budget=memory_budget, backend=backend, threads=threads,
                    prefix_reuse=prefix_reuse, speculative=speculative)

    def ready(state) -> None:
        if on_ready is not None:
            on_ready(url, state.model_id, state.model.max_context)

    def load_failed(exc: BaseException) -> None:
        failure.append(exc)
        if server_ref:
            server_ref[0].should_exit = True

    app = create_app(None, api_key=api_key, max_queue=max_queue, model_name=model_id, max_body_bytes=max_body_bytes,
                     shutdown_timeout=shutdown_timeout, thinking_budget=thinking_budget, tool_choice=tool_choice,
                     loader=load_model,
                     on_ready=ready, on_load_failed=load_failed)
    _run(app, sock, host=host, log_level=log_level, shutdown_timeout=shutdown_timeout,
         on_listening=lambda: on_listening and on_listening(url), server_ref=server_ref)
    if failure:
        raise failure[0]


def _body_limit(max_body_bytes: int | None) -> int:
    """``max_body_bytes`` checked, or the default (8 MiB)."""
    from .admit import MAX_BODY_BYTES

    if max_body_bytes is None:
        max_body_bytes = MAX_BODY_BYTES
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1024:
        raise UserInputError(f"invalid max_body_bytes {max_body_bytes!r}: use at least 1024 bytes (1KiB); the "
                             "default is 8MiB")
    return max_body_bytes


def _run(app, sock: socket.socket, *, host: str, log_level: str, shutdown_timeout: float,
         on_listening: Callable[[], object], server_ref: list) -> None:
    """Run uvicorn on ``sock`` until a signal, then close the port and let go of the model."""
    from ._uvicorn import run_server

    state = app.state.server
    try:
        run_server(app, sock, host=host, log_level=log_level, shutdown_timeout=shutdown_timeout,
                   on_signal=state.begin_shutdown, on_listening=on_listening, server_ref=server_ref)
    finally:
        sock.close()
        state.join()
        if state.model is not None:
            state.model.close()
