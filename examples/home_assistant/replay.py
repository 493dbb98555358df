#!/usr/bin/env python3
"""Replay Home Assistant's recorded Ollama requests against a server and check the tool calls.

    python examples/home_assistant/replay.py --url http://jetson.local:11434

For each request in ha_request.json: POST it to /api/chat (streamed, as Home Assistant does), join the NDJSON
chunks, and check that the answer holds a tool call whose name is one of the request's tools and whose
arguments are valid against that tool's JSON schema (with ``jsonschema`` when it is installed, otherwise the
subset of JSON Schema Home Assistant's tools use). Whether the name is the one a capable model would pick
("expect") is reported, not required. Standard library only; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _post_stream(url: str, body: dict, timeout: float) -> tuple[list[dict], float, float | None]:
    """The NDJSON chunks of one streamed /api/chat, seconds to the end, and to the first tool call."""
    request = urllib.request.Request(url.rstrip("/") + "/api/chat", data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    started, first_call, chunks = time.monotonic(), None, []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            if not line.strip():
                continue
            chunk = json.loads(line)
            chunks.append(chunk)
            if "error" in chunk:
                raise RuntimeError(f"the server answered an error mid-stream: {chunk['error']}")
            if first_call is None and (chunk.get("message") or {}).get("tool_calls"):
                first_call = time.monotonic() - started
    return chunks, time.monotonic() - started, first_call


def _served_model(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/api/tags", timeout=timeout) as response:
        models = json.load(response)["models"]
    if not models:
        raise RuntimeError("GET /api/tags lists no model: is the server still loading?")
    return models[0]["name"]


def check_arguments(args, schema: dict, where: str = "arguments") -> list[str]:
    """Problems of ``args`` against ``schema`` (jsonschema if installed; else the keywords HA's tools use)."""
    try:
        import jsonschema
    except ImportError:
        return _check(args, schema, where)
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{where}: {e.message}" for e in validator.iter_errors(args)]


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check(value, schema: dict, where: str) -> list[str]:
    if "anyOf" in schema:
        return [] if any(not _check(value, s, where) for s in schema["anyOf"]) else [f"{where}: matches no anyOf"]
    t = schema.get("type")
    if t == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = t is None or isinstance(value, _TYPES[t])
    if not ok:
        return [f"{where}: {value!r} is not of type {t}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{where}: {value!r} is out of range")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        problems += [f"{where}: '{k}' is required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                problems += _check(v, props[k], f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}: '{k}' is not a property")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += _check(v, schema["items"], f"{where}[{i}]")
    return problems


def replay(url: str, recording: Path, num_ctx: int | None = None, timeout: float = 600,
           options: dict | None = None) -> list[dict]:
    """Send every recorded request; one report per request (ok, call, problems, timings). ``options`` are added
    to the recorded Ollama options (e.g. {"temperature": 0} for a repeatable run)."""
    model = _served_model(url, timeout)
    reports = []
    for case in json.loads(recording.read_text(encoding="utf-8"))["requests"]:
        body = dict(case["body"], model=model)
        if num_ctx is not None:
            body["options"] = dict(body.get("options") or {}, num_ctx=num_ctx)
        if options:
            body["options"] = dict(body.get("options") or {}, **options)
        chunks, seconds, first_call = _post_stream(url, body, timeout)
        last = chunks[-1] if chunks else {}
        calls = [c for chunk in chunks for c in (chunk.get("message") or {}).get("tool_calls") or []]
        content = "".join((chunk.get("message") or {}).get("content") or "" for chunk in chunks)
        schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in body["tools"]}
        problems = []
        if not last.get("done"):
            problems.append("the stream ended without a done chunk")
        if not calls:
            problems.append(f"no tool call (done_reason {last.get('done_reason')!r}); the answer was {content[:200]!r}")
        for call in calls:
            name, args = call["function"]["name"], call["function"].get("arguments")
            if name not in schemas:
                problems.append(f"{name!r} is not one of the request's tools")
            else:
                problems += check_arguments(args, schemas[name], f"{name}.arguments")
        reports.append({"name": case["name"], "ok": not problems, "problems": problems,
                        "calls": [{"name": c["function"]["name"], "arguments": c["function"].get("arguments")}
                                  for c in calls],
                        "expected": case.get("expect"), "content": content,
                        "prompt_tokens": last.get("prompt_eval_count"), "completion_tokens": last.get("eval_count"),
                        "seconds": round(seconds, 2),
                        "seconds_to_call": None if first_call is None else round(first_call, 2)})
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:11434", help="edgekit serve's address (default %(default)s)")
    ap.add_argument("--recording", type=Path, default=HERE / "ha_request.json")
    ap.add_argument("--num-ctx", type=int, help="replace the recorded options.num_ctx (Home Assistant's "
                                                "'context window size'); at most the server's --max-context")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request (default %(default)s)")
    ap.add_argument("--temperature", type=float, help="add options.temperature (Home Assistant sends none: the "
                                                       "server's default applies; 0 makes a run repeatable)")
    ap.add_argument("--seed", type=int, help="add options.seed")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    a = ap.parse_args(argv)
    try:
        extra = {k: v for k, v in (("temperature", a.temperature), ("seed", a.seed)) if v is not None}
        reports = replay(a.url, a.recording, a.num_ctx, a.timeout, extra)
    except urllib.error.HTTPError as e:
        print(f"replay: {a.url} answered {e.code}: {e.read().decode('utf-8', 'replace')[:300]}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        print(f"replay: cannot replay against {a.url}: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(reports, indent=1, ensure_ascii=False))
    else:
        for r in reports:
            calls = "; ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in r["calls"])
            named = "" if not r["calls"] else (" (the expected tool)" if r["calls"][0]["name"] == r["expected"]
                                               else f" (a capable model calls {r['expected']})")
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']}: {calls or '-'}{named}; prompt {r['prompt_tokens']} "
                  f"tokens, call after {r['seconds_to_call']} s, done after {r['seconds']} s")
            for p in r["problems"]:
                print(f"     {p}")
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
