"""edgekit serve's Ollama API, driven by the real `ollama` Python client (the one Home Assistant uses) against
the real server on loopback, compared against the runtime in-process and against the OpenAI endpoint."""

from __future__ import annotations

import json
import time

import pytest

ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_serve import HELLO, KEY, SKY, Server  # noqa: E402  (the same subprocess server the OpenAI tests use)

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny(tiny_bundle, tmp_path_factory):
    """The tiny R1-style bundle (it reasons), with an API key and a default thinking budget of 8 tokens."""
    folder = tmp_path_factory.mktemp("ollama-tiny")
    key_file = folder / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    server = Server(tiny_bundle, folder, "--api-key-file", str(key_file), "--thinking-budget", "8", key=KEY)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def smol(smollm2_bundle, tmp_path_factory):
    server = Server(smollm2_bundle, tmp_path_factory.mktemp("ollama-smol"))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle):
    from edgekit.runtime.model import load

    return load(tiny_bundle)


def _client(server, **kw) -> ollama.Client:
    return ollama.Client(host=server.url, headers=AUTH if server.key else None, timeout=60, **kw)


def _joined(stream):
    """(thinking, content, last chunk) of a streamed /api/chat."""
    thinking, content, last, done_seen = [], [], None, 0
    for chunk in stream:
        thinking.append(chunk.message.thinking or "")
        content.append(chunk.message.content or "")
        done_seen += chunk.done
        last = chunk
    assert done_seen == 1 and last.done
    return "".join(thinking), "".join(content), last


def test_chat_streamed_and_not_equal_the_runtime_and_reasoning_is_in_thinking(tiny, tiny_model):
    client = _client(tiny)
    opts = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "num_predict": 40}
    ref = tiny_model.generate(messages=HELLO, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7,
                              thinking_budget=8)
    assert ref.reasoning and ref.thinking_budget_hit
    full = client.chat(model="tiny-qwen2", messages=HELLO, options=opts, think=True, stream=False)
    assert (full.message.thinking, full.message.content) == (ref.reasoning, ref.answer)
    assert full.message.role == "assistant" and full.done
    assert full.done_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert (full.prompt_eval_count, full.eval_count) == (ref.prompt_tokens, ref.completion_tokens)
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(full, name), int) and getattr(full, name) >= 0
    # nanoseconds: the whole request takes longer than its prefill, and more than a microsecond
    assert full.total_duration >= full.prompt_eval_duration > 1000

    thinking, content, last = _joined(client.chat(model="tiny-qwen2:latest", messages=HELLO, options=opts,
                                                  think=True, stream=True))
    assert (thinking, content) == (ref.reasoning, ref.answer)
    assert (last.prompt_eval_count, last.eval_count, last.done_reason) == \
           (full.prompt_eval_count, full.eval_count, full.done_reason)

    # without "stream" in the body the answer streams (Ollama's default; the client always sends the field)
    with httpx.stream("POST", tiny.url + "/api/chat", headers=AUTH, timeout=60,
                      json={"model": "tiny-qwen2", "messages": HELLO, "options": opts}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) > 2   # one object per piece of text, then the last
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(x["message"]["content"] for x in lines) == ref.answer

    # num_ctx is the whole window (prompt + answer), as in Ollama: the answer gets what the prompt leaves
    short = client.chat(model="tiny-qwen2", messages=HELLO, think=True, stream=False,
                        options={**opts, "num_ctx": full.prompt_eval_count + 5})
    assert (short.eval_count, short.done_reason) == (5, "length") and ref.completion_tokens > 5

    # think unset: the reasoning still goes to thinking, never into the content
    unset = client.chat(model="tiny-qwen2", messages=HELLO, options=opts, stream=False)
    assert (unset.message.thinking, unset.message.content) == (ref.reasoning, ref.answer)
    # think false: no thinking budget, the model answers at once
    off = client.chat(model="tiny-qwen2", messages=HELLO, options=opts, think=False, stream=False)
    ref0 = tiny_model.generate(messages=HELLO, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7,
                               thinking_budget=0)
    assert ref0.reasoning.strip() == "" and ref0.answer
    assert off.message.thinking is None and off.message.content == ref0.answer


def test_generate_with_system_and_raw(tiny, tiny_model):
    client = _client(tiny)
    opts = {"temperature": 0, "num_predict": 12}
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ref = tiny_model.generate(messages=sys_msgs, max_new_tokens=12, temperature=0, thinking_budget=8)
    out = client.generate(model="tiny-qwen2", prompt="Hi there", system="Be brief.", options=opts, stream=False)
    assert (out.thinking or "", out.response) == (ref.reasoning, ref.answer)
    assert out.eval_count == ref.completion_tokens and out.prompt_eval_count == ref.prompt_tokens

    raw_ref = tiny_model.generate("Once upon a time", max_new_tokens=12, temperature=0, thinking_budget=8)
    pieces = list(client.generate(model="tiny-qwen2", prompt="Once upon a time", raw=True, options=opts,
                                  stream=True))
    assert "".join(p.response for p in pieces) == raw_ref.answer
    assert "".join(p.thinking or "" for p in pieces) == raw_ref.reasoning
    assert pieces[-1].done and pieces[-1].prompt_eval_count == raw_ref.prompt_tokens   # no template, no BOS change

    # no prompt: Ollama's "load the model" request, answered without generating
    assert client.generate(model="tiny-qwen2", prompt="").done_reason == "load"
    assert client.chat(model="tiny-qwen2", messages=[]).done_reason == "load"
    assert client.chat(model="tiny-qwen2").done_reason == "load"   # messages left out
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="nope", prompt="")
    assert e.value.status_code == 404


def test_tags_show_version_ps(tiny, smol):
    client = _client(tiny)
    tags = client.list()
    assert [m.model for m in tags.models] == ["tiny-qwen2"]
    assert tags.models[0].size > 0 and len(tags.models[0].digest) == 12 and tags.models[0].details.family
    show = client.show("tiny-qwen2")
    assert show.capabilities == ["completion", "tools", "thinking"]
    assert show.modelinfo["general.architecture"] and "num_ctx" in show.parameters
    ctx = [v for k, v in show.modelinfo.items() if k.endswith(".context_length")]
    assert ctx == [256]
    assert _client(smol).show(_client(smol).list().models[0].model).capabilities == ["completion", "tools"]
    ps = client.ps()
    assert [m.model for m in ps.models] == ["tiny-qwen2"] and ps.models[0].size > 0
    version = httpx.get(tiny.url + "/api/version", headers=AUTH, timeout=10).json()["version"]
    from edgekit import __version__

    assert version == __version__


def test_errors_in_ollama_shape(tiny):
    client = _client(tiny)
    for call in (lambda: client.chat(model="llama3", messages=HELLO, stream=False),
                 lambda: client.generate(model="llama3", prompt="hi", stream=False),
                 lambda: client.show("llama3:8b")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404
        assert e.value.error.startswith('model "llama3') and 'this server serves "tiny-qwen2"' in e.value.error

    def bad(expected: str, **kw):
        kw = {"model": "tiny-qwen2", "messages": HELLO, "stream": False, **kw}
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(**kw)
        assert e.value.status_code == 400 and isinstance(e.value.error, str)
        assert expected in e.value.error, e.value.error

    bad("options.num_ctx 4096 is larger than this server's context of 256 tokens", options={"num_ctx": 4096})
    bad("invalid options.temperature 5: use a number in [0, 2]", options={"temperature": 5})
    bad("options.mirostat is not supported by edgekit serve: use temperature", options={"mirostat": 2})
    bad("options.num_predict 0", options={"num_predict": 0})
    bad("options.top_k must be a whole number", options={"top_k": "many"})
    bad("tools[0].function.parameters.properties.on.type \"bool\" is not a JSON schema type",
        tools=[{"type": "function", "function": {"name": "turn_on", "description": "x", "parameters": {
            "type": "object", "properties": {"on": {"type": "bool"}}}}}])
    bad("invalid format: failed to compile JSON schema: Unimplemented keys", format={"not": {"type": "string"}})
    bad("messages[0].role", messages=[{"role": "robot", "content": "hi"}])
    # a prompt longer than num_ctx (but within the server's context) is refused, not cut
    bad("but the request's options.num_ctx is 8", options={"num_ctx": 8})

    raw = httpx.post(tiny.url + "/api/chat", headers=AUTH, content=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"].startswith("the body is not valid JSON")
    # the API key: Ollama's shape too
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=tiny.url).list()
    assert e.value.status_code == 401 and e.value.error.startswith("missing API key")


def test_smollm2_greedy_equals_the_openai_endpoint(smol):
    client = _client(smol)
    name = client.list().models[0].model
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=name, messages=SKY, think=True, stream=False)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error

    oa = openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = oa.chat.completions.create(model=name, messages=SKY, max_tokens=12, temperature=0)
    got = client.chat(model=name, messages=SKY, options={"temperature": 0, "num_predict": 12}, stream=False)
    assert got.message.content == want.choices[0].message.content
    assert got.message.content.startswith("The sky is blue because of a process called Rayleigh")
    assert got.message.thinking is None and got.done_reason == "length" and got.eval_count == 12
    # sampled with a seed: the same tokens on both APIs
    want = oa.chat.completions.create(model=name, messages=HELLO, max_tokens=16, temperature=0.8, seed=3)
    _, content, last = _joined(client.chat(model=name, messages=HELLO,
                                           options={"temperature": 0.8, "seed": 3, "num_predict": 16}, stream=True))
    assert content == want.choices[0].message.content
    assert last.eval_count == want.usage.completion_tokens


def test_a_client_that_disconnects_cancels_its_generation(smol):
    name = _client(smol).list().models[0].model
    before = smol.metrics()
    long = {"model": name, "messages": SKY, "options": {"num_predict": 900, "temperature": 0.8, "seed": 1}}
    with httpx.Client(base_url=smol.url, timeout=30) as http:
        with http.stream("POST", "/api/chat", json=long) as r:
            lines = r.iter_lines()
            assert [json.loads(next(lines))["done"] for _ in range(3)] == [False] * 3
        # connection closed mid-stream: the next request must not wait for 900 tokens (~1 min here)
    with httpx.Client(base_url=smol.url, timeout=2) as http:   # not streamed: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            http.post("/api/generate", json={**long, "prompt": "Tell me a long story.", "stream": False})
    t0 = time.monotonic()
    quick = _client(smol).generate(model=name, prompt="Hi", options={"num_predict": 3})
    assert quick.done and quick.eval_count <= 3 and time.monotonic() - t0 < 10
    after = smol.metrics()
    cancelled = 'edgekit_chat_completions_total{finish_reason="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 2
    assert after['edgekit_http_requests_total{path="/api/chat",status="200"}'] >= 1
