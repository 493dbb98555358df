"""edgekit serve: the real server (the `edgekit serve` console script, uvicorn, a free loopback port) driven
with the official openai client and with raw HTTP, compared against the runtime called in-process."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))
KEY = "test-key-4c1d9e"
HELLO = [{"role": "user", "content": "Hello! Who are you?"}]
SKY = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
READY = re.compile(r"ready at (http://127\.0\.0\.1:\d+)/v1")


class Server:
    """`edgekit serve BUNDLE --port 0 ...` in a subprocess; output goes to a file (a full pipe would block it)."""

    def __init__(self, bundle: Path, folder: Path, *args: str, key: str | None = None):
        self.key = key
        self.log = folder / "server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([EDGEKIT, "serve", str(bundle), "--port", "0", "--log-level", "warning",
                                          *args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            found = READY.search(self.output())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"edgekit serve exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"edgekit serve did not get ready:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, key: str | None = "default", **kw) -> openai.OpenAI:
        key = (self.key or "unused") if key == "default" else key
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=kw.pop("timeout", 60),
                             **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"edgekit serve ignored SIGTERM:\n{self.output()}") from None


@pytest.fixture(scope="module")
def tiny_server(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-tiny")
    key_file = folder / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    server = Server(tiny_bundle, folder, "--api-key-file", str(key_file), "--max-queue", "4", key=KEY)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def smol_server(smollm2_bundle, tmp_path_factory):
    server = Server(smollm2_bundle, tmp_path_factory.mktemp("serve-smol"), "--max-queue", "1")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle):
    from edgekit.runtime.model import load

    return load(tiny_bundle)


def _reasoning(obj) -> str | None:
    return getattr(obj, "reasoning_content", None)


def _stream(client, **kw):
    """(reasoning, content, finish_reason, usage) from a streamed completion, deltas concatenated."""
    reasoning, content, finish, usage = [], [], None, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning.append(_reasoning(choice.delta) or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), finish, usage


# ----- conversation ---------------------------------------------------------------------------------
def test_stream_equals_non_stream_and_reasoning_is_separate(tiny_server, tiny_model):
    client = tiny_server.client()
    kw = dict(model="anything", messages=HELLO, max_tokens=40, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"thinking_budget": 8, "ignore_eos": True})
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    # the reference: the runtime itself, same seed and settings
    ref = tiny_model.generate(messages=HELLO, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7,
                              thinking_budget=8, ignore_eos=True)
    assert (_reasoning(msg), msg.content) == (ref.reasoning, ref.answer)
    assert ref.reasoning and ref.answer and ref.thinking_budget_hit
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 40 and full.usage.prompt_tokens == ref.prompt_tokens
    assert full.usage.total_tokens == 40 + ref.prompt_tokens
    assert full.usage.completion_tokens_details.reasoning_tokens == 8
    assert full.model == "tiny-qwen2"

    reasoning, content, finish, usage = _stream(client, stream_options={"include_usage": True}, **kw)
    assert (reasoning, content, finish) == (ref.reasoning, ref.answer, "length")
    assert usage.completion_tokens == 40

    other = client.chat.completions.create(**{**kw, "seed": 8})
    assert (_reasoning(other.choices[0].message), other.choices[0].message.content) != (ref.reasoning, ref.answer)


def test_real_model_stream_equals_non_stream(smol_server):
    client = smol_server.client()
    greedy = client.chat.completions.create(model="smollm2", messages=SKY, max_tokens=12, temperature=0)
    # transformers' fp32 greedy output for this prompt (shared/ENVIRONMENT.md)
    assert greedy.choices[0].message.content.startswith("The sky is blue because of a process called Rayleigh")
    assert "reasoning_content" not in greedy.choices[0].message.model_dump(exclude_none=True)

    kw = dict(model="smollm2", messages=HELLO, max_tokens=16, temperature=0.8, seed=3)
    full = client.chat.completions.create(**kw)
    reasoning, content, finish, usage = _stream(client, **kw)
    assert content == full.choices[0].message.content and content.strip()
    assert reasoning == "" and finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens   # usage on the final chunk by default


def test_models_health_metrics(tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-qwen2"]
    assert httpx.get(tiny_server.url + "/health", timeout=10).json()["status"] == "ok"   # no key needed
    text = httpx.get(tiny_server.url + "/metrics", headers=tiny_server.headers, timeout=10).text
    for name in ("edgekit_http_requests_total", "edgekit_completion_tokens_total",
                 "edgekit_time_to_first_token_seconds_bucket", "edgekit_decode_tokens_per_second_bucket",
                 "edgekit_queue_depth", "process_resident_memory_bytes"):
        assert name in text
    assert "edgekit_model_loaded 1" in text and "edgekit_model_max_context_tokens 256" in text


def test_api_key(tiny_server):
    with tiny_server.http() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/metrics").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer " + KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        tiny_server.client(key="nope").chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    ok = tiny_server.client().chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_prefix_reuse_in_usage_and_metrics(tiny_server, tmp_path):
    """A second request sharing the system prompt prefills only the rest: usage and /metrics count it; a server
    with --no-prefix-reuse prefills everything and answers the same."""
    shared = "You control the lights of a house with twelve rooms. " * 4   # (the tiny template drops system)
    turns = [[{"role": "user", "content": shared + q}] for q in ("Kitchen light on?", "Is the door locked?")]
    before = tiny_server.metrics()
    client = tiny_server.client()
    got = [client.chat.completions.create(model="m", messages=t, max_tokens=4, temperature=0) for t in turns]
    after = tiny_server.metrics()
    cached = got[1].usage.prompt_tokens_details.cached_tokens
    assert cached > 40 and cached < got[1].usage.prompt_tokens
    delta = {k: after[k] - before.get(k, 0) for k in ("edgekit_prompt_tokens_cached_total",
                                                      "edgekit_prompt_tokens_prefilled_total",
                                                      "edgekit_prompt_tokens_total")}
    assert delta["edgekit_prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in got)
    assert delta["edgekit_prompt_tokens_cached_total"] == sum(r.usage.prompt_tokens_details.cached_tokens
                                                              for r in got)
    assert delta["edgekit_prompt_tokens_prefilled_total"] == delta["edgekit_prompt_tokens_total"] - \
        delta["edgekit_prompt_tokens_cached_total"]
    plain = Server(tiny_server_bundle(tiny_server), tmp_path, "--no-prefix-reuse")
    try:
        again = [plain.client().chat.completions.create(model="m", messages=t, max_tokens=4, temperature=0)
                 for t in turns]
        assert [r.usage.prompt_tokens_details.cached_tokens for r in again] == [0, 0]
        assert [r.choices[0].message.content for r in again] == [r.choices[0].message.content for r in got]
        assert plain.metrics()["edgekit_prompt_tokens_cached_total"] == 0
    finally:
        assert plain.stop() == 0


def tiny_server_bundle(server) -> str:
    return server.proc.args[2]


# ----- bad requests ---------------------------------------------------------------------------------
def _malformed(rng: random.Random) -> list[tuple[str, bytes, dict]]:
    """100 (label, body, headers) cases, none of which is a valid request."""
    good = json.dumps({"model": "m", "messages": HELLO, "max_tokens": 4}).encode()
    j = {"Content-Type": "application/json"}
    cases = []
    wrong = [("messages", "hi"), ("messages", 5), ("messages", {"role": "user"}), ("messages", None),
             ("messages", []), ("messages", [5]), ("messages", [{"role": 3, "content": "x"}]),
             ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "user"}]),
             ("messages", [{"role": "robot", "content": "x"}]),
             ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
             ("messages", [{"role": "user", "content": [{"type": "text", "text": 1}]}]),
             ("temperature", "hot"), ("temperature", -0.5), ("temperature", 9), ("temperature", [1]),
             ("top_p", 1.5), ("top_p", -0.1), ("top_p", "x"), ("max_tokens", 0), ("max_tokens", -3),
             ("max_tokens", "10"), ("max_tokens", 2.5), ("max_tokens", True), ("max_completion_tokens", {}),
             ("seed", "x"), ("seed", 1.5), ("seed", 2**70), ("stop", 5), ("stop", [1, 2]), ("stop", ["a"] * 40),
             ("stream", "yes"), ("stream", 1), ("stream_options", 3), ("n", 2), ("model", 7),
             ("thinking_budget", -1), ("thinking_budget", "lots"), ("top_k", -1), ("min_p", 1),
             ("repetition_penalty", 0), ("presence_penalty", 5), ("frequency_penalty", "x"),
             ("ignore_eos", "true")]
    for field, value in wrong:
        body = {"model": "m", "messages": HELLO, "max_tokens": 4, field: value}
        cases.append((f"type-{field}", json.dumps(body).encode(), j))
    huge = "many words " * 20000
    cases += [
        ("huge-prompt", json.dumps({"messages": [{"role": "user", "content": huge}]}).encode(), j),
        ("huge-role", json.dumps({"messages": [{"role": "x" * 100000, "content": "hi"}]}).encode(), j),
        ("huge-body", b'{"messages": [{"role": "user", "content": "' + b"a" * (9 * 1024 * 1024) + b'"}]}', j),
        ("huge-int", b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", j),
        ("deep", b"[" * 100000 + b"]" * 100000, j),
        ("surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', j),
    ]
    for bad in (b"\xff\xfe", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"):
        cases.append(("utf8", b'{"messages": [{"role": "user", "content": "' + bad + b'"}]}', j))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        cases.append(("ctype", good, {"Content-Type": ctype}))
    for body in (b"", b"   ", b"[]", b"null", b'"text"', b"42", b"true", b"NaN",
                 b'{"messages": ' + json.dumps(HELLO).encode() + b', "temperature": Infinity}'):
        cases.append(("not-object", body, j))
    while len(cases) < 100:   # the rest: fuzzed JSON: truncated, garbage appended, a structural character replaced
        how = rng.choice(("truncate", "append", "replace"))
        if how == "truncate":
            body = good[:rng.randrange(1, len(good) - 1)]
        elif how == "append":
            body = good + bytes(rng.randrange(33, 127) for _ in range(rng.randrange(1, 5)))
        else:
            spots = [i for i, c in enumerate(good) if chr(c) in '{}[]:,"']
            i = rng.choice(spots)
            body = good[:i] + rng.choice([b"x", b"#", b"", b"'", b"{{"]) + good[i + 1:]
        try:
            json.loads(body)
            continue   # still valid JSON: not a malformed case
        except ValueError:
            cases.append((f"fuzz-{how}", body, j))
    return cases


def test_100_malformed_requests_get_4xx_and_the_server_keeps_serving(tiny_server):
    cases = _malformed(random.Random(1234))
    assert len(cases) == 100
    before = tiny_server.metrics()
    with tiny_server.http() as http:
        for label, body, headers in cases:
            r = http.post("/v1/chat/completions", content=body, headers={**headers, **tiny_server.headers})
            assert 400 <= r.status_code < 500, (label, body[:80], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"], (label, error)
            assert "Traceback" not in r.text and "File \"" not in r.text
        assert http.get("/nope", headers=tiny_server.headers).status_code == 404
        assert http.get("/v1/chat/completions", headers=tiny_server.headers).status_code == 405
        too_long = http.post("/v1/chat/completions", headers=tiny_server.headers,
                             json={"messages": [{"role": "user", "content": "word " * 400}]}).json()["error"]
        assert too_long["code"] == "context_length_exceeded" and "256" in too_long["message"]
    after = tiny_server.metrics()
    k = '{path="/v1/chat/completions",status="%s"}'
    rejected = sum(after.get("edgekit_http_requests_total" + k % s, 0) - before.get("edgekit_http_requests_total"
                                                                                   + k % s, 0)
                   for s in ("400", "413", "415"))
    assert rejected == 101
    ok = tiny_server.client().chat.completions.create(model="m", messages=HELLO, max_tokens=3)
    assert ok.usage.completion_tokens >= 1 or ok.choices[0].finish_reason == "stop"


# ----- load, queue, disconnects ---------------------------------------------------------------------
def _rss(server: Server) -> float:
    return server.metrics()["process_resident_memory_bytes"]


def test_load_16_clients_5_requests_queue_4(tiny_server, tiny_model):
    seeds = (11, 12, 13)
    kw = dict(max_new_tokens=200, temperature=0.7, ignore_eos=True)
    expected = {s: tiny_model.generate(messages=HELLO, seed=s, **kw) for s in seeds}
    client = tiny_server.client()
    for s in seeds:   # warm up (allocator arenas) before measuring memory
        client.chat.completions.create(model="m", messages=HELLO, max_tokens=200, temperature=0.7, seed=s,
                                       extra_body={"ignore_eos": True})
    rss0, m0 = _rss(tiny_server), tiny_server.metrics()
    outcomes: list[tuple] = []
    start = threading.Barrier(16)

    def one_client(i: int) -> None:
        c = tiny_server.client(timeout=60)
        start.wait()
        for j in range(5):
            seed = seeds[(i + j) % 3]
            try:
                r = c.chat.completions.create(model="m", messages=HELLO, max_tokens=200, temperature=0.7,
                                              seed=seed, extra_body={"ignore_eos": True})
                outcomes.append(("ok", seed, r))
            except openai.RateLimitError as e:
                outcomes.append(("429", seed, e))
            except Exception as e:
                outcomes.append(("failed", seed, e))

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(outcomes) == 80
    assert [o for o in outcomes if o[0] == "failed"] == []
    ok = [o for o in outcomes if o[0] == "ok"]
    limited = [o for o in outcomes if o[0] == "429"]
    for _, seed, r in ok:   # concurrency must not mix requests up: each equals the runtime's own output
        ref = expected[seed]
        assert (_reasoning(r.choices[0].message), r.choices[0].message.content) == (ref.reasoning, ref.answer)
    for _, _, e in limited:
        assert int(e.response.headers["retry-after"]) >= 1
        assert e.response.json()["error"]["code"] == "queue_full"
    assert ok and limited, (len(ok), len(limited))
    m1 = tiny_server.metrics()
    k = 'edgekit_http_requests_total{path="/v1/chat/completions",status="%s"}'
    assert m1[k % 200] - m0[k % 200] == len(ok)          # none lost: the server counted the same
    assert m1[k % 429] - m0.get(k % 429, 0) == len(limited)
    assert m1["edgekit_queue_depth"] == 0 and m1["edgekit_generation_active"] == 0
    health = httpx.get(tiny_server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and not health["busy"]
    grown = _rss(tiny_server) - rss0
    assert grown < 32 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over {len(ok)} requests"
    print(f"\nload: {len(ok)} ok, {len(limited)} x 429 in {time.monotonic() - t0:.1f}s, RSS +{grown / 2**20:.1f} MiB")


def _read_stream(lines, chunks: int) -> list[dict]:
    """Read SSE events from `lines` (one iter_lines() iterator, kept by the caller: dropping it closes the
    connection) until `chunks` content deltas have arrived."""
    got = []
    for line in lines:
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                got.append(event)
                if len(got) >= chunks:
                    return got
    raise AssertionError("the stream ended early")


LONG = {"model": "m", "messages": HELLO, "max_tokens": 900, "ignore_eos": True}


def test_client_disconnect_cancels_and_frees_the_slot(smol_server):
    before = smol_server.metrics()
    with smol_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            _read_stream(r.iter_lines(), 3)
        # connection closed mid-stream: the next request must not wait for 900 tokens (~1 min here)
    with smol_server.http(timeout=2) as http:       # non-streaming: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=LONG)
    t0 = time.monotonic()
    quick = smol_server.client().chat.completions.create(model="m", messages=HELLO, max_tokens=3)
    assert quick.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - t0 < 10
    after = smol_server.metrics()
    cancelled = 'edgekit_chat_completions_total{finish_reason="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 2
    assert after["edgekit_generation_active"] == 0


def test_queue_full_gives_429_with_retry_after(smol_server):
    results = {}
    with smol_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            _read_stream(lines, 1)                     # A generates

            def waiting() -> None:                     # B waits in the queue (--max-queue 1)
                results["B"] = smol_server.client().chat.completions.create(model="m", messages=HELLO, max_tokens=2)

            b = threading.Thread(target=waiting)
            b.start()
            deadline = time.monotonic() + 10
            while httpx.get(smol_server.url + "/health", timeout=5).json()["queue_depth"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            c = httpx.post(smol_server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10)
            assert c.status_code == 429 and int(c.headers["retry-after"]) >= 1
            assert c.json()["error"]["type"] == "rate_limit_error"
        b.join(30)                                     # A disconnected: B gets the slot at once
    assert not b.is_alive() and results["B"].choices[0].message.content is not None


def test_sigterm_drains_and_exits_cleanly(smollm2_bundle, tmp_path):
    server = Server(smollm2_bundle, tmp_path, "--max-queue", "2", "--shutdown-timeout", "1")
    queued = {}
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            _read_stream(lines, 1)

            def waiting() -> None:
                queued["r"] = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=30)

            b = threading.Thread(target=waiting)
            b.start()
            while httpx.get(server.url + "/health", timeout=5).json()["queue_depth"] < 1:
                time.sleep(0.05)
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            tail = [line for line in lines if line]   # the stream ends: cut after the 1 s grace
        assert time.monotonic() - t0 < 8
        b.join(10)
    assert tail[-1] == "data: [DONE]"
    assert any('"shutting_down"' in line for line in tail)
    assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "shutting_down"
    assert server.stop() == 0
    assert "edgekit serve: stopped" in server.output() and "Traceback" not in server.output()


# ----- without a port -------------------------------------------------------------------------------
def test_health_is_503_until_the_model_is_attached(tiny_model):
    from starlette.testclient import TestClient

    from edgekit.server.app import create_app

    app = create_app(None, model_name="later")
    client = TestClient(app)
    assert client.get("/health").status_code == 503 and client.get("/health").json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    app.state.server.attach(tiny_model)
    assert client.get("/health").json() == {"status": "ok", "model": "later", "busy": False, "queue_depth": 0}


def test_server_default_thinking_budget_applies_when_the_request_sends_none(tiny_model):
    from starlette.testclient import TestClient

    from edgekit.server.app import create_app

    client = TestClient(create_app(tiny_model, thinking_budget=3))
    body = {"messages": HELLO, "max_tokens": 12, "seed": 5, "temperature": 0.9, "ignore_eos": True}
    default = client.post("/v1/chat/completions", json=body).json()
    assert default["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    ref = tiny_model.generate(messages=HELLO, max_new_tokens=12, seed=5, temperature=0.9, ignore_eos=True,
                              thinking_budget=3)
    assert default["choices"][0]["message"] == {"role": "assistant", "content": ref.answer,
                                                "reasoning_content": ref.reasoning}
    own = client.post("/v1/chat/completions", json={**body, "thinking_budget": 6}).json()
    assert own["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6


def test_slot_is_first_come_first_served_and_bounded():
    from edgekit.server.queue import ClientGone, GenerationSlot, QueueFull

    async def scenario():
        slot = GenerationSlot(max_queue=2)
        a, b, c = slot.enter(), slot.enter(), slot.enter()
        assert a.granted and not b.future.done() and slot.depth == 2
        with pytest.raises(QueueFull):
            slot.enter()
        slot.fail(b, ClientGone())       # b's client leaves while waiting: c is next
        slot.release(a)
        assert c.granted and slot.depth == 0   # b was skipped and dropped
        slot.release(b)                        # b's request task lets go: a no-op now
        assert c.granted and slot.busy
        slot.release(c)
        assert not slot.busy
        b.future.exception()              # retrieved, as the request's task would

    asyncio.run(scenario())


def test_cli_refuses_bad_keys_and_warns_on_network_hosts(tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"], env={"EDGEKIT_API_KEY": None})
    assert r.exit_code == 2
    assert "reachable from the network and no API key" in r.output and "does not exist" in r.output
    key = tmp_path / "key"
    key.write_text("\n")
    r = runner.invoke(cli, ["serve", str(tmp_path), "--api-key-file", str(key)])
    assert r.exit_code == 2 and "is empty" in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path), "--api-key", "a b"])
    assert r.exit_code == 2 and "invalid API key" in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path), "--api-key", "x", "--api-key-file", str(key)])
    assert r.exit_code == 2 and "use one of them" in r.output


# ----- bounded work before the queue (issue 13) ------------------------------------------------------------------
def test_a_prompt_longer_than_the_context_can_hold_is_refused_by_size_before_tokenizing(tiny_server, tiny_model):
    """What the context can hold in characters is max_context x the longest token of the vocabulary: a longer
    conversation is refused from its length alone (the message counts characters, not tokens)."""
    limit = tiny_model.max_context * tiny_model.codec.max_token_chars
    huge = [{"role": "user", "content": "Tell me more about the sky, please. " * 2}] * 60000   # ~4.6 MB of JSON
    with tiny_server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": huge}, headers=tiny_server.headers)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert error["message"].startswith(f"the prompt has more than {limit} characters (no text that long fits in "
                                           f"256 tokens of this tokenizer) but this server's context is 256 tokens")
        # just under the limit in characters, but more tokens than the context: counted, then refused
        near = [{"role": "user", "content": "word " * (limit // 5 - 20)}]
        r = http.post("/v1/chat/completions", json={"messages": near}, headers=tiny_server.headers)
        assert r.status_code == 400 and re.search(r"the prompt has \d+ tokens but", r.json()["error"]["message"])
        ok = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, headers=tiny_server.headers)
        assert ok.status_code == 200


def test_max_body_is_configurable(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import cli

    server = Server(tiny_bundle, tmp_path, "--max-body", "64KiB")
    try:
        with server.http() as http:
            body = json.dumps({"messages": [{"role": "user", "content": "x" * 70000}]})
            r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 413
            assert r.json()["error"]["message"] == ("the request body is larger than 64.0 KiB (edgekit serve "
                                                    "--max-body): send a shorter conversation")
            r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
            assert r.status_code == 200
    finally:
        assert server.stop() == 0
    r = CliRunner().invoke(cli, ["serve", str(tiny_bundle), "--max-body", "100"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: invalid --max-body 100: use at least 1KiB (the default is 8MiB)"
