"""asyncio front of ``Model.stream``: ``async for event in model.astream(...)`` and ``await model.agenerate(...)``.

The generation itself stays blocking code: each ``astream`` runs ``Model.stream`` on a worker thread of its own
(onnxruntime releases the GIL while a step runs, so the event loop keeps serving other tasks) and hands the
events to the loop through an ``asyncio.Queue`` filled with ``loop.call_soon_threadsafe``.

Leaving a stream early — a ``break`` (the generator is then closed: at once inside ``contextlib.aclosing``,
otherwise when it is dropped), a cancelled task, an exception in the consumer — sets the cancel event the
generation loop checks between steps, and the generator then waits, without blocking the loop, until its worker
thread has finished with the model: after ``astream`` is closed no thread of it is left and the Model's lock is
free. That wait is at most one step (one decode step or one prefill chunk).

The Model's lock serialises generations: a second ``astream`` waits for the first, it does not fail. While it
waits for the lock its worker wakes every ``_WAKE_S`` to see whether its stream was abandoned, so cancelling a
stream that is still in line does not wait for the one that runs.

Only asyncio (stdlib): the runtime's dependencies stay numpy, onnxruntime, tokenizers and jinja2.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

from ..errors import GenerationError

_END = object()      # the worker thread's last item on a stream's queue
_WAKE_S = 0.05       # how often a worker waiting for the Model's lock checks whether its stream was abandoned


class _StreamCancel(threading.Event):
    """The cancel event handed to ``Model.stream``: set when the stream is abandoned, and also reads as set when
    the caller's own ``cancel`` event is (the generation loop only asks ``is_set()``)."""

    def __init__(self, outer: threading.Event | None):
        super().__init__()
        self._outer = outer

    def abandoned(self) -> bool:
        return super().is_set()

    def is_set(self) -> bool:
        return super().is_set() or (self._outer is not None and self._outer.is_set())


def _wait_turn(model, cancel: _StreamCancel) -> bool:
    """Wait for the Model's lock without taking it (``stream`` takes it); False if the stream was abandoned."""
    lock = getattr(model, "_lock", None)
    if lock is None:
        return True
    while not lock.acquire(timeout=_WAKE_S):
        if cancel.abandoned():
            return False
    lock.release()  # another caller may take it before stream() does: stream() then waits, which is still correct
    return True


def _work(model, prompt, kw: dict, cancel: _StreamCancel, push: Callable[[object], bool]) -> None:
    """Worker thread: run the blocking generation and push its events (or its exception) to the loop."""
    try:
        if not _wait_turn(model, cancel):
            return
        for event in model.stream(prompt, cancel=cancel, **kw):
            if not push(event):
                cancel.set()  # the loop is gone: stop at the next step
    except Exception as e:  # raised in the consumer (GenerationError for bad arguments, a backend failure ...)
        push(e)
    finally:
        push(_END)


async def _until_end(queue: asyncio.Queue) -> None:
    """Read the queue up to the worker's last item. A cancellation meanwhile is held back until then: the worker
    stops within one step, and leaving earlier would leave it running with the Model's lock."""
    cancelled = None
    while True:
        try:
            if await queue.get() is _END:
                break
        except asyncio.CancelledError as e:
            cancelled = e
    if cancelled is not None:
        raise cancelled


async def astream(model, prompt: str | None = None, *, cancel: threading.Event | None = None,
                  **kw) -> AsyncIterator:
    """``Model.stream`` for asyncio: the same arguments, the same Events ("reasoning"/"answer" deltas, then "done").

    ``cancel`` (optional, a threading.Event) stops the generation like ``stream``'s (it ends with a "done" whose
    finish_reason is "cancelled"); leaving the loop early stops it too. Errors (GenerationError for bad
    arguments) are raised in the consumer."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = _StreamCancel(cancel)

    def push(item) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
            return True
        except RuntimeError:  # the loop is closed: nobody listens any more
            return False

    worker = threading.Thread(target=_work, args=(model, prompt, kw, stop, push), name="edgekit-astream")
    worker.start()
    ended = False
    try:
        while True:
            item = await queue.get()
            if item is _END:
                ended = True
                return
            if isinstance(item, BaseException):
                raise item  # the finally below still reads up to the worker's _END
            yield item
    finally:
        stop.set()
        if not ended:
            await _until_end(queue)
        worker.join()  # it has pushed its last item: this returns at once


async def agenerate(model, prompt: str | None = None, **kw):
    """``Model.generate`` for asyncio: the GenerationResult of one generation (cancelled with the awaiting task)."""
    async with contextlib.aclosing(astream(model, prompt, **kw)) as events:
        async for event in events:
            if event.kind == "done":
                return event.result
    raise GenerationError("generation ended without a result")
