"""What every handler of one server shares: the model, the generation slot, metrics, and the shutdown state.

It lives in ``app.state.server`` and is touched only on the event loop's thread. The request path
(:mod:`edgekit.server.admit`, :mod:`edgekit.server.jobs`) and the endpoints (:mod:`edgekit.server.app`,
:mod:`edgekit.server.ollama`) read it; it knows none of them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .api_errors import ApiError
from .metrics import ServerMetrics
from .queue import GenerationSlot


def default_model_id(model) -> str:
    """The id clients see: the bundle folder's name (clients may send any model name; there is one)."""
    return Path(model.manifest.folder).resolve().name or "edgekit"


class ServerState:
    """Everything the handlers share. Lives in ``app.state.server``; touched only on the event loop's thread."""

    def __init__(self, *, api_key: str | None, max_queue: int, model_name: str | None, shutdown_timeout: float,
                 max_body_bytes: int, thinking_budget: int | None = None, tool_choice: str = "auto"):
        self.model = None
        self.tool_choice = tool_choice           # for requests with tools and no tool_choice
        self.thinking_budget = thinking_budget   # for requests that do not set one
        self.model_id = model_name
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.slot = GenerationSlot(max_queue)
        self.metrics = ServerMetrics(max_queue)
        self.shutdown_timeout = shutdown_timeout
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.load_error: BaseException | None = None
        self.active = None                     # the jobs.Job generating now: stopped on shutdown
        self.avg_generation_s = 1.0            # moving average, for Retry-After
        self.started = int(time.time())
        self._executor: ThreadPoolExecutor | None = None
        self._prepare: ThreadPoolExecutor | None = None

    # ----- lifecycle ----------------------------------------------------------------------------
    def attach(self, model) -> None:
        """The model is loaded: start serving it."""
        self.model = model
        if self.model_id is None:
            self.model_id = default_model_id(model)
        self.metrics.loaded.set(1)
        self.metrics.context.set(model.max_context)
        memory = getattr(model, "memory", None)
        if memory is not None and hasattr(memory, "total_bytes"):
            self.metrics.model_memory.set(memory.total_bytes)

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new work, drop the waiting line, give the running generation ``shutdown_timeout``."""
        if self.draining:
            return
        self.draining = True
        self.metrics.loaded.set(0)
        self.slot.close()
        if self.active is not None:
            asyncio.get_running_loop().call_later(self.shutdown_timeout, self._cut_active)

    def _cut_active(self) -> None:
        if self.active is not None:
            self.active.stop("shutdown")

    def executor(self) -> ThreadPoolExecutor:
        # One worker: generations are serialised by the slot anyway; created on first use, not at import.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekit-generate")
        return self._executor

    async def prepare(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` (parse, render, tokenize a request) on the one thread for that: requests are prepared
        one at a time, so a burst of large ones holds one request's worth of memory, not one per request
        (and one thread's malloc arena, not one per worker thread)."""
        if self._prepare is None:
            self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekit-prepare")
        return await asyncio.get_running_loop().run_in_executor(self._prepare, work)

    def close(self) -> None:
        if not self.draining:
            self.begin_shutdown()
        if self.active is not None:
            self.active.stop("shutdown")
        for pool in (self._executor, self._prepare):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Wait for the worker thread to let go of the model (after ``close``; it stops at the next token)."""
        if self.active is not None:
            self.active.cancel.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ----- helpers ------------------------------------------------------------------------------
    def require_model(self):
        if self.draining:
            raise ApiError(503, "the server is shutting down: retry against another instance or after restart",
                           type="server_error", code="shutting_down")
        if self.model is None:
            raise ApiError(503, "the model is still loading: retry when GET /health answers 200",
                           type="server_error", code="model_loading", headers={"Retry-After": "5"})
        return self.model

    def queue_full(self) -> ApiError:
        return ApiError(429, f"the server is busy: one generation is running and {self.slot.depth} requests are "
                             f"waiting (the limit, --max-queue {self.slot.max_queue}); retry after the Retry-After "
                             "seconds", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(self.retry_after())})

    def retry_after(self) -> int:
        """Seconds until a place in line is likely free: the line ahead times the average generation."""
        return max(1, min(300, math.ceil(self.avg_generation_s * (self.slot.depth + 1))))
