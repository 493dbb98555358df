"""``edgekit serve``: an OpenAI-compatible HTTP API for one bundle, for smart-home hubs and robot stacks.

Not part of ``edgekit.runtime``: this package needs the ``serve`` extra (starlette, uvicorn), imported only
when a server is created. ``serve()`` (:mod:`edgekit.server.main`) runs until SIGTERM/SIGINT;
``edgekit.server.app.create_app`` gives the ASGI app for a loaded model without opening a port.
"""

from .main import bind, is_loopback, require_extra, serve, url_for

__all__ = ["serve", "bind", "url_for", "is_loopback", "require_extra"]
