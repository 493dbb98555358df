"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges, histograms.

All updates happen on the server's event-loop thread (request handlers and the callbacks that run when a
generation ends), so the metrics need no locks. ``render()`` reads the process's resident memory from
``/proc/self/status`` at scrape time; on systems without /proc that line is left out.
"""

from __future__ import annotations

import math
from pathlib import Path


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    x = float(x)
    if x == math.inf:
        return "+Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        key = tuple(str(v) for v in labels)
        self.values[key] = self.values.get(key, 0.0) + by

    def get(self, *labels: str) -> float:
        return self.values.get(tuple(str(v) for v in labels), 0.0)

    kind = "counter"

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[tuple(str(v) for v in labels)] = float(value)


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)   # non-cumulative per bucket; cumulated when rendered
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {_num(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


def process_memory(status: Path = Path("/proc/self/status")) -> dict[str, int]:
    """{"rss": bytes, "peak_rss": bytes} from /proc (Linux, including Jetson); {} where there is no /proc."""
    try:
        text = status.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM") and rest.strip().endswith("kB"):
            out["rss" if key == "VmRSS" else "peak_rss"] = int(rest.split()[0]) * 1024
    return out


class ServerMetrics:
    """Everything ``GET /metrics`` reports for one server."""

    def __init__(self, max_queue: int):
        self.requests = Counter("edgekit_http_requests_total", "HTTP requests by path and status code.",
                                ("path", "status"))
        self.completions = Counter("edgekit_chat_completions_total",
                                   "Chat completions that ran, by finish reason (stop, length, cancelled, error).",
                                   ("finish_reason",))
        self.prompt_tokens = Counter("edgekit_prompt_tokens_total", "Prompt tokens processed.")
        self.cached_tokens = Counter("edgekit_prompt_tokens_cached_total",
                                     "Prompt tokens whose KV cache rows were kept from the previous request.")
        self.prefilled_tokens = Counter("edgekit_prompt_tokens_prefilled_total",
                                        "Prompt tokens run through the model (prompt - cached).")
        self.completion_tokens = Counter("edgekit_completion_tokens_total",
                                         "Tokens generated (reasoning and answer).")
        self.reasoning_tokens = Counter("edgekit_reasoning_tokens_total", "Tokens generated inside <think>.")
        self.draft_tokens = Counter("edgekit_speculative_drafted_tokens_total",
                                    "Speculative decoding: drafted tokens checked by verify steps.")
        self.accepted_tokens = Counter("edgekit_speculative_accepted_tokens_total",
                                       "Speculative decoding: drafted tokens the model chose (no model call).")
        self.ttft = Histogram("edgekit_time_to_first_token_seconds",
                              "Request admitted -> first token chosen (queue wait + tokenize + prefill).",
                              (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_wait = Histogram("edgekit_queue_wait_seconds", "Time a request waited for the generation slot.",
                                    (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.decode_speed = Histogram("edgekit_decode_tokens_per_second",
                                      "Decode speed of each generation (tokens after the first / time).",
                                      (1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000))
        self.duration = Histogram("edgekit_generation_seconds", "Wall time of each generation (tokenize to end).",
                                  (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting for the generation slot.")
        self.queue_capacity = Gauge("edgekit_queue_capacity", "--max-queue: waiting requests allowed before 429.")
        self.queue_capacity.set(max_queue)
        self.active = Gauge("edgekit_generation_active", "1 while a generation is running.")
        self.loaded = Gauge("edgekit_model_loaded", "1 once the model is loaded and the server is ready.")
        self.context = Gauge("edgekit_model_max_context_tokens", "KV-cache size (prompt + completion) in tokens.")
        self.model_memory = Gauge("edgekit_model_memory_bytes",
                                  "Memory the loaded bundle was planned to need (weights + KV cache + workspace).")
        self._all = (self.requests, self.completions, self.prompt_tokens, self.cached_tokens, self.prefilled_tokens,
                     self.completion_tokens, self.reasoning_tokens, self.draft_tokens, self.accepted_tokens,
                     self.ttft, self.queue_wait, self.decode_speed, self.duration,
                     self.queue_depth, self.queue_capacity, self.active, self.loaded, self.context,
                     self.model_memory)

    def render(self) -> str:
        out: list[str] = []
        for metric in self._all:
            out.append(f"# HELP {metric.name} {metric.help}")
            out.append(f"# TYPE {metric.name} {metric.kind}")
            out.extend(metric.lines())
        mem = process_memory()
        for key, name, help_text in (("rss", "process_resident_memory_bytes", "Resident memory of the server."),
                                     ("peak_rss", "edgekit_process_peak_resident_memory_bytes",
                                      "Peak resident memory of the server (VmHWM).")):
            if key in mem:
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {mem[key]}"]
        return "\n".join(out) + "\n"
