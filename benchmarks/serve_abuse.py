"""Memory of `edgekit serve` under a burst of oversized requests (issue 13, item 6); prints a table.

    python benchmarks/serve_abuse.py BUNDLE [--requests 8] [--messages 60000] [--extra "--max-queue 8"]

Starts `edgekit serve BUNDLE` on a free loopback port, sends one small request (warm-up), resets the
process's peak RSS (``/proc/PID/clear_refs``), then sends ``--requests`` requests at once, each one message
repeated ``--messages`` times (60,000 gives a 7.6 MB body, under the 8 MiB body limit). Reported: the
status codes, how long they took, the server's RSS before, its peak during (``VmHWM``) and its RSS two
seconds after each burst (``--rounds``: what it keeps, and whether that grows), and whether a normal
request still works. Goal (issue 13): the burst
adds <= 200 MiB at peak and nothing is retained. Needs httpx.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import start_server


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--messages", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=3, help="bursts, one after another (is anything kept each time?)")
    ap.add_argument("--extra", default="", help="more `edgekit serve` options, e.g. '--max-queue 8'")
    args = ap.parse_args()

    message = {"role": "user", "content": "Tell me everything about the history of the sky, "
                                          "the sea and the mountains, please, in detail!!"}
    body = json.dumps({"model": "m", "messages": [message] * args.messages, "max_tokens": 4}).encode()
    log = Path(tempfile.mkdtemp()) / "server.log"
    proc, url = start_server(args.bundle, 8, shlex.split(args.extra), log)
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            r = http.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 4})
            assert r.status_code == 200, r.text
        time.sleep(1)
        before = _status(proc.pid)["VmRSS"]
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")   # reset VmHWM to the current RSS
        results: list[tuple[int, float, str]] = []
        lock = threading.Lock()

        def one() -> None:
            t0 = time.perf_counter()
            try:
                r = httpx.post(url + "/v1/chat/completions", content=body,
                               headers={"Content-Type": "application/json"}, timeout=600)
                code, text = r.status_code, r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
            except httpx.HTTPError as e:
                code, text = 0, type(e).__name__
            with lock:
                results.append((code, time.perf_counter() - t0, text))

        kept = []
        started = time.perf_counter()
        for _ in range(args.rounds):
            threads = [threading.Thread(target=one) for _ in range(args.requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(2)
            kept.append(_status(proc.pid)["VmRSS"] - before)
        wall = time.perf_counter() - started
        after = _status(proc.pid)
        with httpx.Client(base_url=url, timeout=600) as http:
            ok = http.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 4}).status_code
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    codes = Counter(f"{code} {what}".strip() for code, _, what in results)
    rows = [("bundle", args.bundle), ("body", f"{len(body) / 1e6:.1f} MB ({args.messages} messages)"),
            ("requests at once", str(args.requests)), ("answers", ", ".join(f"{n}x {k}" for k, n in codes.items())),
            ("rounds", str(args.rounds)),
            ("slowest answer", f"{max(t for _, t, _ in results):.1f} s (all rounds {wall:.1f} s)"),
            ("RSS before", f"{_mib(before)} MiB"),
            ("peak during", f"{_mib(after['VmHWM'])} MiB (+{_mib(after['VmHWM'] - before)} MiB)"),
            ("RSS 2 s after each burst", ", ".join(f"+{_mib(k)}" for k in kept) + " MiB"),
            ("normal request after", str(ok))]
    width = max(len(k) for k, _ in rows)
    print("| measure | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
