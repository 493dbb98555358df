"""Test helpers that watch a loaded Model without changing what it does."""

from __future__ import annotations


def record_results(monkeypatch, model) -> list:
    """Wrap ``model.stream`` (for the test) so that every generation's final GenerationResult is appended to the
    returned list, also for generations whose consumer left early."""
    results = []
    real = model.stream

    def stream(*a, **kw):
        for event in real(*a, **kw):
            if event.kind == "done":
                results.append(event.result)
            yield event
    monkeypatch.setattr(model, "stream", stream)
    return results
