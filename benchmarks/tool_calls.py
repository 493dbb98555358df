"""Home Assistant's recorded tool-call requests against `edgekit serve`: prompt size and time to the tool call.

    python benchmarks/tool_calls.py BUNDLE [--rounds 3] [--extra "--no-prefix-reuse"]

Starts `edgekit serve BUNDLE --tool-choice after-user` on a free loopback port and sends each request of
examples/home_assistant/ha_request.json (streamed /api/chat, as Home Assistant does), interleaved with the same
request without its tools (A, B, A, B ...: the load of other processes hits both), ``--rounds`` times.
Printed per request and variant: prompt tokens (with tools: Home Assistant's prompt plus the fallback block
listing the tools), completion tokens, median seconds to the first tool-call chunk and to the end, and the
tool called. With prefix reuse on (the server's default, and what Home Assistant gets: its system prompt is
the same on every request) a repeated request prefills only what changed; ``--extra --no-prefix-reuse``
measures cold prefills. Needs a bundle with a context of at least 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "examples" / "home_assistant"))
from replay import _post_stream, _served_model  # noqa: E402
from serve_load import start_server  # noqa: E402


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-ctx", type=int, default=None, help="options.num_ctx sent (default: the recorded one)")
    ap.add_argument("--extra", default="", help="more edgekit serve arguments, e.g. \"--no-prefix-reuse\"")
    a = ap.parse_args()
    recording = json.loads((ROOT / "examples" / "home_assistant" / "ha_request.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(a.bundle, 4, ["--tool-choice", "after-user", *shlex.split(a.extra)],
                                 Path(tmp) / "server.log")
        base = url.rsplit("/v1", 1)[0]
        try:
            model = _served_model(base, 60)
            rows = {}
            for _ in range(a.rounds):
                for case in recording["requests"]:
                    for variant in ("tools", "no tools"):
                        body = dict(case["body"], model=model)
                        if a.num_ctx:
                            body["options"] = dict(body["options"], num_ctx=a.num_ctx)
                        if variant == "no tools":
                            body.pop("tools")
                        chunks, seconds, to_call = _post_stream(base, body, 1800)
                        last = chunks[-1]
                        calls = [c["function"]["name"] for ch in chunks
                                 for c in (ch.get("message") or {}).get("tool_calls") or []]
                        row = rows.setdefault((case["name"], variant), {"s": [], "call": [], "last": None})
                        row["s"].append(seconds)
                        row["call"].append(to_call)
                        row["last"], row["calls"] = last, calls
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'request':<30} {'variant':<9} {'prompt':>7} {'output':>7} {'to call s':>10} {'total s':>8}  call")
    for (name, variant), row in rows.items():
        last = row["last"]
        print(f"{name:<30} {variant:<9} {last.get('prompt_eval_count', 0):>7} {last.get('eval_count', 0):>7} "
              f"{str(_median(row['call'])):>10} {_median(row['s']):>8}  {', '.join(row['calls']) or '-'}")
    print(f"(medians of {a.rounds} rounds; server: edgekit serve {a.bundle} --tool-choice after-user {a.extra})")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average during the run: {' '.join(load)}")


if __name__ == "__main__":
    urllib.request.getproxies = dict   # loopback only
    main()
