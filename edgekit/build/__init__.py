"""The build pipeline: target files, precisions, the memory plan, calibration, export -> bundle, evaluation.

``pipeline`` runs the stages (``edgekit build``); ``target`` and ``precision`` say what a device runs,
``memory_plan`` whether a model fits it, ``calibration`` and ``evaluate`` feed and score the quantizer,
``staging`` writes the output atomically.

This file only re-exports the pipeline's entry points, lazily (PEP 562): ``pipeline`` imports the exporter
and with it ``onnx`` (about a second), which ``edgekit plan``, ``edgekit targets`` and the engine builder
must not pay when they import ``edgekit.build.target`` or ``edgekit.build.memory_plan``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import BuildPlan, BuildResult, QuantOptions, build, preflight

__all__ = ["BuildPlan", "BuildResult", "QuantOptions", "build", "preflight"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".pipeline", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
