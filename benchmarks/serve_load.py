"""Load test for `edgekit serve`: many concurrent clients against one server; prints a table.

    python benchmarks/serve_load.py BUNDLE [--clients 16] [--requests 5] [--max-queue 4] [--max-tokens 64]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY] ...   # a server already running

Each client sends its requests one after another (no retries: a 429 is counted, not retried, so the
table shows how the queue limit sheds load). Reported: wall time, throughput (completed requests/s and
generated tokens/s), latency p50/p95/max of completed requests (and time to first token when --stream),
how many got 429, any other failures, and the server's resident memory before and after (from /metrics).
Needs httpx (installed with the openai client or the test extra).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

READY = re.compile(r"ready at (http://[^\s]+)/v1")


def start_server(bundle: str, max_queue: int, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    with open(log, "wb") as out:
        proc = subprocess.Popen([edgekit, "serve", bundle, "--port", "0", "--max-queue", str(max_queue),
                                 "--log-level", "warning", *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = READY.search(log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            sys.exit(f"edgekit serve exited ({proc.returncode}):\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("edgekit serve did not become ready in 300 s")


def rss(url: str, headers: dict) -> float | None:
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def one_request(client: httpx.Client, body: dict, stream: bool) -> dict:
    t0 = time.perf_counter()
    out = {"status": None, "latency": None, "ttft": None, "tokens": 0, "error": None}
    try:
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                out["tokens"] = r.json()["usage"]["completion_tokens"]
        else:
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                out["status"] = r.status_code
                if r.status_code == 200:
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        choices = event.get("choices") or []
                        delta = choices[0]["delta"] if choices else {}
                        if out["ttft"] is None and (delta.get("content") or delta.get("reasoning_content")):
                            out["ttft"] = time.perf_counter() - t0
                        if event.get("usage"):
                            out["tokens"] = event["usage"]["completion_tokens"]
                        if "error" in event:
                            out["error"] = event["error"]["message"]
                else:
                    r.read()
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency"] = time.perf_counter() - t0
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle folder to serve (omit with --url)")
    ap.add_argument("--url", help="use a running server instead, e.g. http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=5, help="requests per client")
    ap.add_argument("--max-queue", type=int, default=4, help="--max-queue of the server started here")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Name three uses of a robot vacuum, one line each.")
    ap.add_argument("--stream", action="store_true", help="stream the responses (measures time to first token)")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    ap.add_argument("--timeout", type=float, default=600, help="per-request timeout in seconds")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for edgekit serve")
    args = ap.parse_args()
    if bool(args.bundle) == bool(args.url):
        ap.error("give a BUNDLE to serve, or --url of a running server")

    proc = None
    if args.bundle:
        log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
        proc, url = start_server(args.bundle, args.max_queue, args.server_arg, log)
    else:
        url = args.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": "bench", "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens, "temperature": 0.7, "ignore_eos": args.ignore_eos}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as c:   # warm-up
            warm = one_request(c, body, False)
            if warm["status"] != 200:
                sys.exit(f"warm-up request failed: {warm}")
        rss_before = rss(url, headers)
        results: list[dict] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client_loop(i: int) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as c:
                barrier.wait()
                for j in range(args.requests):
                    res = one_request(c, {**body, "seed": i * 1000 + j}, args.stream)
                    with lock:
                        results.append(res)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = rss(url, headers)
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    limited = [r for r in results if r["status"] == 429]
    failed = [r for r in results if not (r["status"] == 200 and not r["error"]) and r["status"] != 429]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    rows = [
        ("requests sent", f"{len(results)} ({args.clients} clients x {args.requests})"),
        ("completed (200)", str(len(ok))),
        ("refused (429)", str(len(limited))),
        ("failed / other", str(len(failed))),
        ("wall time", f"{wall:.2f} s"),
        ("throughput", f"{len(ok) / wall:.2f} req/s, {tokens / wall:.1f} generated tok/s"),
        ("latency p50 / p95 / max",
         f"{pct(lat, .5):.2f} / {pct(lat, .95):.2f} / {max(lat, default=float('nan')):.2f} s"),
    ]
    if args.stream:
        rows.append(("time to first token p50 / p95", f"{pct(ttft, .5):.2f} / {pct(ttft, .95):.2f} s"))
    if rss_before and rss_after:
        rows.append(("server RSS before / after", f"{rss_before / 2**20:.0f} / {rss_after / 2**20:.0f} MiB"))
    rows.append(("healthy afterwards", "yes" if healthy else "NO"))
    width = max(len(k) for k, _ in rows)
    mode = "streaming" if args.stream else "non-streaming"
    print(f"edgekit serve load test: {url}, max_tokens {args.max_tokens}, {mode}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for r in failed[:5]:
        print(f"  failure: status {r['status']}: {r['error']}")
    sys.exit(0 if healthy and not failed else 1)


if __name__ == "__main__":
    main()
