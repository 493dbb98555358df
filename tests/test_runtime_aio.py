"""``Model.astream`` / ``Model.agenerate`` (edgekit.runtime.aio) on real bundles: the same events as ``stream``,
the loop stays free, leaving early stops the generation and leaves no thread and a free lock, generations
serialise, errors reach the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from spies import record_results

from edgekit.errors import GenerationError
from edgekit.runtime.model import load

HELLO = [{"role": "user", "content": "hello robot"}]
SKY = [{"role": "user", "content": "Why is the sky blue?"}]
LONG = dict(messages=SKY, max_new_tokens=600, temperature=0, ignore_eos=True)   # seconds on SmolLM2


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    return load(tiny_bundle)


@pytest.fixture(scope="module")
def smol(smollm2_bundle):
    return load(smollm2_bundle)


@pytest.fixture
def spy(monkeypatch):
    """spy(model) -> the list of every generation's result (also those whose consumer left early)."""
    return lambda model: record_results(monkeypatch, model)


def _same(a, b):
    assert (a.text, a.reasoning, a.answer, a.tokens, a.finish_reason, a.prompt_tokens, a.completion_tokens,
            a.reasoning_tokens, a.thinking_budget_hit) == \
           (b.text, b.reasoning, b.answer, b.tokens, b.finish_reason, b.prompt_tokens, b.completion_tokens,
            b.reasoning_tokens, b.thinking_budget_hit)


def test_astream_yields_the_same_events_as_stream(tiny):
    kw = dict(messages=HELLO, max_new_tokens=40, temperature=0, thinking_budget=12)
    sync = list(tiny.stream(**kw))

    async def collect():
        return [e async for e in tiny.astream(**kw)]

    threads = threading.active_count()
    events = asyncio.run(collect())
    assert [(e.kind, e.text) for e in events[:-1]] == [(e.kind, e.text) for e in sync[:-1]]
    assert {e.kind for e in events} == {"reasoning", "answer", "done"}   # the budget made it answer
    _same(events[-1].result, sync[-1].result)
    _same(asyncio.run(tiny.agenerate(**kw)), sync[-1].result)
    assert threading.active_count() == threads


def test_generation_runs_off_the_event_loop(tiny, monkeypatch):
    # The generation waits for a coroutine to open a gate: if astream ran it on the loop's thread, the
    # coroutine could not run and the generation would fail (after 30 s) instead of producing its answer.
    gate = threading.Event()
    real = tiny.stream
    threads_seen = set()

    def gated(*a, **kw):
        if not gate.wait(timeout=30):
            raise RuntimeError("the event loop was blocked")
        threads_seen.add(threading.get_ident())
        yield from real(*a, **kw)
    monkeypatch.setattr(tiny, "stream", gated)

    async def main():
        async def open_gate():
            await asyncio.sleep(0)
            gate.set()
        opener = asyncio.create_task(open_gate())
        result = await tiny.agenerate(messages=HELLO, max_new_tokens=8, temperature=0)
        await opener
        return result

    assert asyncio.run(main()).completion_tokens == 8
    assert threads_seen and threading.get_ident() not in threads_seen


async def _long_generation(model) -> asyncio.Task:
    """A task streaming a long generation, returned once its first event has arrived."""
    first = asyncio.Event()

    async def consume():
        async for _ in model.astream(**LONG):
            first.set()
    task = asyncio.create_task(consume())
    await first.wait()
    return task


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancelling_the_task_stops_the_generation_and_frees_the_lock(smol, spy):
    results = spy(smol)
    threads = threading.active_count()

    async def main():
        await _cancel(await _long_generation(smol))
        # astream's cleanup waited for its worker: nothing runs, the lock is free, right now
        assert not smol._lock.locked() and threading.active_count() == threads
        return await smol.agenerate(messages=SKY, max_new_tokens=24, temperature=0)

    after = asyncio.run(main())
    cancelled = results[0]
    assert cancelled.finish_reason == "cancelled" and 0 < cancelled.completion_tokens < 600
    _same(after, smol.generate(messages=SKY, max_new_tokens=24, temperature=0))
    assert threading.active_count() == threads


def test_break_and_consumer_errors_stop_the_generation(smol, spy):
    results = spy(smol)
    threads = threading.active_count()

    async def main():
        async with contextlib.aclosing(smol.astream(**LONG)) as events:
            async for _event in events:
                break
        assert not smol._lock.locked() and threading.active_count() == threads
        with pytest.raises(KeyError):
            async with contextlib.aclosing(smol.astream(**LONG)) as events:
                async for _event in events:
                    raise KeyError("the consumer failed")
        assert not smol._lock.locked() and threading.active_count() == threads
        # A plain break without aclosing: the dropped generator is closed by the loop soon after (asyncio's
        # async-generator finalizer); the next generation waits for the lock, then runs normally.
        async for _event in smol.astream(**LONG):
            break
        return await smol.agenerate(messages=SKY, max_new_tokens=8, temperature=0)

    after = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["cancelled", "cancelled", "cancelled", "length"]
    assert all(r.completion_tokens < 600 for r in results[:3]) and after.completion_tokens == 8
    assert threading.active_count() == threads


def test_two_concurrent_astreams_serialise(smol):
    a = dict(messages=SKY, max_new_tokens=16, temperature=0)
    b = dict(messages=HELLO, max_new_tokens=16, temperature=0)
    threads = threading.active_count()

    async def main():
        order = []

        async def consume(name, kw):
            async for event in smol.astream(**kw):
                order.append(name)
                if event.kind == "done":
                    return event.result
        results = await asyncio.gather(consume("a", a), consume("b", b))
        return order, results

    order, (ra, rb) = asyncio.run(main())
    # one generation at a time: every event of one stream comes before every event of the other
    first = order[0]
    assert order == [first] * order.count(first) + [x for x in order if x != first]
    assert order.count("a") > 1 and order.count("b") > 1
    _same(ra, smol.generate(**a))
    _same(rb, smol.generate(**b))
    assert threading.active_count() == threads


def test_cancelling_a_stream_waiting_in_line_does_not_wait_for_the_running_one(smol, spy):
    results = spy(smol)
    threads = threading.active_count()

    async def main():
        async def waiting():
            async for _ in smol.astream(messages=HELLO, max_new_tokens=8):
                pass
        running = await _long_generation(smol)
        queued = asyncio.create_task(waiting())
        await asyncio.sleep(0.2)   # let its worker start waiting for the lock
        await _cancel(queued)
        still_running = not running.done()   # the 600-token generation is far from over
        await _cancel(running)
        return still_running

    assert asyncio.run(main())
    assert [r.finish_reason for r in results] == ["cancelled"]   # the waiting one never generated
    assert threading.active_count() == threads


def test_errors_reach_the_consumer(tiny):
    threads = threading.active_count()

    async def bad(**kw):
        async for _ in tiny.astream(messages=HELLO, **kw):
            pass

    with pytest.raises(GenerationError, match="invalid max_new_tokens 0"):
        asyncio.run(bad(max_new_tokens=0))
    with pytest.raises(GenerationError, match="give either a prompt or messages"):
        asyncio.run(tiny.agenerate("hi", messages=HELLO))
    with pytest.raises(GenerationError, match="invalid thinking_budget"):
        asyncio.run(tiny.agenerate(messages=HELLO, thinking_budget=-1))
    assert not tiny._lock.locked() and threading.active_count() == threads
    assert asyncio.run(tiny.agenerate(messages=HELLO, max_new_tokens=4)).completion_tokens == 4


def test_callers_cancel_event_ends_with_a_cancelled_result(smol):
    cancel = threading.Event()

    async def main():
        events = []
        async for event in smol.astream(**LONG, cancel=cancel):
            events.append(event)
            if len(events) == 3:
                cancel.set()
        return events

    events = asyncio.run(main())
    assert events[-1].kind == "done" and events[-1].result.finish_reason == "cancelled"
    assert events[-1].result.completion_tokens < 600


def test_the_astream_benchmark_prints_its_table(tiny_bundle):
    script = Path(__file__).parents[1] / "benchmarks" / "astream.py"
    out = subprocess.run([sys.executable, str(script), str(tiny_bundle), "--tokens", "4", "--runs", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "fp32 bundle, 4 tokens, 1 runs, medians"
    assert [line.split()[0] for line in lines[2:]] == ["stream", "astream", "blocking"]
    assert lines[2].split()[-1] == "-" and all(float(line.split()[-1]) >= 0 for line in lines[3:])
