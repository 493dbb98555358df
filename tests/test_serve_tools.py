"""Tool calls through edgekit serve, driven by the real `openai` and `ollama` clients against the real SmolLM2-135M,
and Home Assistant's recorded request replayed by examples/home_assistant/replay.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from test_serve import Server  # noqa: E402
from test_tools import CONVERSATION, TIMER, WEATHER  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[1] / "examples" / "home_assistant"
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIMER)}


@pytest.fixture(scope="module")
def smol4k(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M with a 4096-token context: Home Assistant's prompt with its tools is ~1,700 tokens."""
    from edgekit.build import build
    from edgekit.build.target import load_target

    return build(smollm2_gguf, load_target("cpu"), output=tmp_path_factory.mktemp("bundles") / "smollm2-4k",
                 context=4096, precision="fp32").bundle


@pytest.fixture(scope="module")
def server(smol4k, tmp_path_factory):
    server = Server(smol4k, tmp_path_factory.mktemp("serve-tools"), "--tool-choice", "after-user")
    yield server
    assert server.stop() == 0


def _valid(call_name: str, arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[call_name])
    return args


def test_openai_each_tool_choice(server):
    client = server.client()
    for choice in ("required", {"type": "function", "function": {"name": "set_timer"}}):
        r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIMER], tool_choice=choice,
                                           temperature=0, max_tokens=80)
        m = r.choices[0]
        assert m.finish_reason == "tool_calls" and m.message.content is None and m.message.tool_calls
        for call in m.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
            _valid(call.function.name, call.function.arguments)
        if isinstance(choice, dict):
            assert [c.function.name for c in m.message.tool_calls] == ["set_timer"]
        else:   # one call unless parallel_tool_calls is true
            assert len(m.message.tool_calls) == 1
    # none: no tools shown or called, free text
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=12)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    # auto: text or calls, never a broken call (the 135M model answers in text here)
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="auto",
                                       temperature=0, max_tokens=24)
    m = r.choices[0]
    if m.message.tool_calls:
        assert m.finish_reason == "tool_calls" and all(_valid(c.function.name, c.function.arguments)
                                                       for c in m.message.tool_calls)
    else:
        assert "<tool_call>" not in m.message.content and m.finish_reason in ("stop", "length")
    # parallel_tool_calls: true allows several calls; each is valid
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIMER], tool_choice="required",
                                       parallel_tool_calls=True, temperature=0, max_tokens=200)
    # (a 135M model repeats its call: up to 8, or until max_tokens cuts one; the complete ones are kept)
    assert 1 <= len(r.choices[0].message.tool_calls) <= 8
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    for call in r.choices[0].message.tool_calls:
        _valid(call.function.name, call.function.arguments)


def test_openai_streamed_deltas_reassemble_to_the_same_call(server):
    client = server.client()
    kw = dict(model="m", messages=ASK, tools=[WEATHER, TIMER], tool_choice="required", temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0].tool_calls[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name and first.function.arguments == ""
    assert all(d.tool_calls[0].id is None and d.tool_calls[0].function.name is None for d in deltas[1:])
    arguments = "".join(d.tool_calls[0].function.arguments for d in deltas)
    assert (first.function.name, arguments) == (whole.message.tool_calls[0].function.name,
                                                whole.message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls" == whole.finish_reason
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_openai_multi_turn_with_tool_results(server, smol4k):
    from edgekit.runtime import tool_defs, tools
    from edgekit.runtime.bundle import read_manifest
    from edgekit.runtime.text import TextCodec

    client = server.client()
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                *CONVERSATION[1:3], {"role": "tool", "tool_call_id": "call_1",
                                     "content": [{"type": "text", "text": '{"temp": 21}'}]},
                *CONVERSATION[4:]]
    r = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    _valid(call.function.name, call.function.arguments)
    # the server rendered the earlier call and the result as runtime.tools plans them (same prompt tokens)
    manifest = read_manifest(smol4k)
    codec = TextCodec(manifest.path(manifest.tokenizer["file"]).read_text(),
                      manifest.path(manifest.tokenizer["chat_template"]).read_text(), manifest.tokenizer)
    plan = tools.plan(codec, CONVERSATION, tool_defs.parse_tools([WEATHER]), "required")
    prompt = codec.render(plan.messages)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert r.usage.prompt_tokens == len(codec.encode(prompt, add_special_tokens=False))
    # the answer after the result: the model may answer in text (no tool_choice: the server's after-user)
    r = client.chat.completions.create(model="m", messages=messages[:4], tools=[WEATHER], temperature=0,
                                       max_tokens=20)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_openai_bad_tools_are_400s_naming_the_field(server):
    http = server.http()

    def bad(param: str, text: str, **body):
        body = {"messages": ASK, **body}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and text in error["message"], error

    bad("tools[0].function.parameters.properties.city.type", '"str" is not a JSON schema type',
        tools=[{"type": "function", "function": {"name": "w", "parameters": {
            "type": "object", "properties": {"city": {"type": "str"}}}}}])
    bad("tools[0].function.name", "1-64 letters", tools=[{"type": "function", "function": {"name": "get weather"}}])
    bad("tools", "must be a list of tool objects", tools={"name": "w"})
    bad("tool_choice", 'use "auto", "required", "none"', tools=[WEATHER], tool_choice="always")
    bad("tool_choice.function.name", "is not one of the tools", tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "set_timer"}})
    bad("tool_choice", "needs tools", tool_choice="required")
    bad("response_format", "cannot be combined with tools", tools=[WEATHER], tool_choice="required",
        response_format={"type": "json_object"})
    bad("messages[3].tool_call_id", "a tool message answers the call with that id", tools=[WEATHER],
        messages=[*CONVERSATION[:3], {"role": "tool", "content": "21"}])
    bad("messages[2].tool_calls[0].function.arguments", "is not a JSON object", tools=[WEATHER], messages=[
        *CONVERSATION[:2], {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "Paris"}}]}])


def test_ollama_tools(server):
    client = ollama.Client(host=server.url, timeout=120)
    name = client.list().models[0].model
    assert "tools" in client.show(name).capabilities
    # no tool_choice in Ollama's API: the server's --tool-choice after-user requires a call after a user turn
    r = client.chat(model=name, messages=ASK, tools=[WEATHER, TIMER], options={"temperature": 0, "num_predict": 80})
    assert r.done and r.message.tool_calls and r.message.content == ""
    for call in r.message.tool_calls:
        assert isinstance(call.function.arguments, dict)
        _valid(call.function.name, call.function.arguments)
    chunks = list(client.chat(model=name, messages=ASK, tools=[WEATHER, TIMER], stream=True,
                              options={"temperature": 0, "num_predict": 80}))
    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == 1 and chunks[-1].done and not with_calls[0].done
    assert [(c.function.name, dict(c.function.arguments)) for c in with_calls[0].message.tool_calls] == \
        [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls]
    # the result of the call, as Home Assistant sends it (role tool, content only): the model may answer
    follow = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, {"role": "tool", "content": "21"}]
    r = client.chat(model=name, messages=follow, tools=[WEATHER], options={"temperature": 0, "num_predict": 16})
    assert r.done and r.done_reason in ("stop", "length")
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=name, messages=ASK, tools=[{"type": "function", "function": {
            "name": "w", "parameters": {"type": "object", "properties": {"city": {"type": "str"}}}}}])
    assert e.value.status_code == 400 and "tools[0].function.parameters.properties.city.type" in e.value.error


def _replay_module():
    spec = importlib.util.spec_from_file_location("ha_replay", EXAMPLE / "replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_home_assistant_request_replays(server, capsys):
    replay = _replay_module()
    recording = json.loads((EXAMPLE / "ha_request.json").read_text())
    # greedy: Home Assistant sends no temperature, and a sampled 135M model may ramble inside a call until the limit
    reports = replay.replay(server.url, EXAMPLE / "ha_request.json", options={"temperature": 0})
    assert [r["name"] for r in reports] == [c["name"] for c in recording["requests"]]
    for report, case in zip(reports, recording["requests"]):
        assert report["ok"], report
        names = {t["function"]["name"] for t in case["body"]["tools"]}
        assert report["calls"] and all(c["name"] in names for c in report["calls"])
        assert report["prompt_tokens"] > 1000   # the whole HA prompt with its tools reached the model
    # the script's own exit status and report line
    assert replay.main(["--url", server.url, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == len(recording["requests"]) and "FAIL" not in out
    # the fallback-free checker agrees with jsonschema on a bad value
    schema = recording["requests"][0]["body"]["tools"][0]["function"]["parameters"]
    assert replay._check({"device_class": ["toaster"]}, schema, "a") and \
        replay.check_arguments({"device_class": ["toaster"]}, schema)
