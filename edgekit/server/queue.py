"""The generation slot: one generation at a time, a bounded line of waiting requests, 429 beyond it.

The device holds one model and one KV cache, so requests take turns. ``enter()`` either hands the slot over
at once, puts the request in line (first come, first served), or raises :class:`QueueFull` when
``max_queue`` requests are already waiting. Everything here runs on the event loop's thread; the worker
thread that generates reports its end through the loop (``release`` is called from a done-callback).
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..errors import UserInputError


class QueueFull(Exception):
    """The slot is busy and the line is full: answer 429."""


class ShuttingDown(Exception):
    """The server is draining (SIGTERM): requests still waiting will not be served."""


class ClientGone(Exception):
    """The client disconnected while its request was waiting."""


class Ticket:
    """One request's place: ``future`` resolves when the slot is its own (or fails: ShuttingDown, ClientGone)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future):
        self.future = future

    @property
    def granted(self) -> bool:
        return self.future.done() and not self.future.cancelled() and self.future.exception() is None


class GenerationSlot:
    def __init__(self, max_queue: int):
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise UserInputError(f"invalid max_queue {max_queue!r}: use a whole number >= 0 (0 = no waiting line)")
        self.max_queue = max_queue
        self._waiting: deque[Ticket] = deque()
        self._owner: Ticket | None = None
        self.closed = False

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one generating)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._owner is not None

    def enter(self) -> Ticket:
        """Take the slot or a place in line; raises QueueFull or ShuttingDown."""
        if self.closed:
            raise ShuttingDown()
        ticket = Ticket(asyncio.get_running_loop().create_future())
        if self._owner is None and not self._waiting:
            self._grant(ticket)
        elif len(self._waiting) >= self.max_queue:
            raise QueueFull()
        else:
            self._waiting.append(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The ticket's holder is done with the slot, or gives up its place in line. Safe to call twice."""
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            if not ticket.future.done():
                ticket.future.cancel()
            return
        if self._owner is ticket:
            self._owner = None
            while self._waiting:
                nxt = self._waiting.popleft()
                if not nxt.future.done():  # skip tickets whose client already left
                    self._grant(nxt)
                    return

    def fail(self, ticket: Ticket, exc: Exception) -> None:
        """Wake a waiting ticket with ``exc`` (its client left); it stays listed until ``release``."""
        if not ticket.future.done():
            ticket.future.set_exception(exc)

    def close(self) -> None:
        """Stop admitting; everyone still waiting gets ShuttingDown. The running generation is left alone."""
        self.closed = True
        for ticket in self._waiting:
            if not ticket.future.done():
                ticket.future.set_exception(ShuttingDown())

    def _grant(self, ticket: Ticket) -> None:
        self._owner = ticket
        ticket.future.set_result(None)
