"""Structured output on edgekit serve: OpenAI's ``response_format`` through the real ``openai`` client (also
its ``parse`` helper with a pydantic model) and Ollama's ``format`` through the real ``ollama`` client, on the
real SmolLM2 and on the tiny R1-style bundle (the thought stays free); the 400s checked by their text."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("llguidance")

from test_serve import Server, _reasoning, _stream  # noqa: E402

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                     "minItems": 1, "maxItems": 3}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and hobbies."}]


def _rf(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def smol(smollm2_bundle, tmp_path_factory):
    server = Server(smollm2_bundle, tmp_path_factory.mktemp("serve-constrain"))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tiny(tiny_bundle, tmp_path_factory):
    server = Server(tiny_bundle, tmp_path_factory.mktemp("serve-constrain-tiny"), "--thinking-budget", "10")
    yield server
    assert server.stop() == 0


def test_openai_response_format_stream_and_not(smol):
    client = smol.client()
    name = client.models.list().data[0].id
    r = client.chat.completions.create(model=name, messages=ASK, response_format=_rf(PERSON), temperature=0,
                                       max_tokens=200)
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), PERSON)
    _, streamed, finish, _ = _stream(client, model=name, messages=ASK, response_format=_rf(PERSON), temperature=0,
                                     max_tokens=200)
    assert streamed == content and finish == "stop"
    for seed in (1, 2):
        _, streamed, finish, _ = _stream(client, model=name, messages=ASK, response_format=_rf(PERSON),
                                         temperature=0.9, seed=seed, max_tokens=200)
        assert finish == "stop"
        jsonschema.validate(json.loads(streamed), PERSON)

    r = client.chat.completions.create(model=name, messages=ASK, response_format={"type": "json_object"},
                                       temperature=0.7, seed=1, max_tokens=300)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    # text is no constraint: the same answer as without response_format
    plain = client.chat.completions.create(model=name, messages=ASK, temperature=0, max_tokens=20)
    text = client.chat.completions.create(model=name, messages=ASK, temperature=0, max_tokens=20,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content
    # the answer cannot finish within max_tokens: "length", never a complete-looking "stop"
    r = client.chat.completions.create(model=name, messages=ASK, response_format=_rf(PERSON), max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_openai_parse_helper_with_a_pydantic_model(smol):
    class Item(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        price: float = pydantic.Field(ge=0, le=1000)
        in_stock: bool

    client = smol.client()
    name = client.models.list().data[0].id
    r = client.chat.completions.parse(model=name, response_format=Item, temperature=0, max_tokens=200,
                                      messages=[{"role": "user", "content": "Describe a shop item as JSON."}])
    item = r.choices[0].message.parsed
    assert isinstance(item, Item) and 0 <= item.price <= 1000


def test_openai_bad_response_formats_are_400s_naming_the_field(smol):
    client = smol.client()

    def bad(response_format, param: str, text: str):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", messages=ASK, response_format=response_format, max_tokens=4)
        assert e.value.body["param"] == param and text in e.value.body["message"], e.value.body

    bad({"type": "xml"}, "response_format.type",
        'response_format.type "xml" is not valid: use one of text, json_object, json_schema')
    bad({"type": "json_schema"}, "response_format.json_schema",
        "response_format.json_schema must be an object with name and schema, got null")
    bad({"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}},
        "response_format.json_schema.name", 'response_format.json_schema.name "a b" is not valid')
    bad(_rf([1, 2]), "response_format.json_schema.schema",
        "response_format.json_schema.schema must be a JSON schema object, got array")
    bad(_rf({"not": {"type": "string"}}), "response_format.json_schema.schema",
        'invalid response_format.json_schema.schema: failed to compile JSON schema: Unimplemented keys: ["not"]')
    bad(_rf({"$ref": "#/$defs/nope"}), "response_format.json_schema.schema",
        "Pointer '/$defs/nope' does not exist")
    bad(_rf({"type": "object", "properties": {"a": {"type": "strng"}}}), "response_format.json_schema.schema",
        "Invalid type: strng")
    # the server is fine afterwards
    r = client.chat.completions.create(model="x", messages=ASK, response_format={"type": "json_object"},
                                       max_tokens=300, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_r1_reasoning_is_free_and_the_answer_follows_the_schema(tiny):
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
             "required": ["ok", "n"], "additionalProperties": False}
    client = tiny.client()
    for seed in (0, 1):
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], seed=seed,
                                           temperature=1.0, response_format=_rf(small), max_tokens=120)
        msg = r.choices[0].message
        assert _reasoning(msg) and r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(msg.content), small)
    reasoning, content, finish, _ = _stream(client, model="x", messages=[{"role": "user", "content": "hi"}], seed=5,
                                            temperature=1.0, response_format=_rf(small), max_tokens=120)
    assert reasoning and finish == "stop"
    jsonschema.validate(json.loads(content), small)


def test_ollama_format_json_and_schema(smol):
    client = ollama.Client(host=smol.url, timeout=60)
    name = client.list().models[0].model
    r = client.chat(model=name, messages=ASK, format=PERSON, options={"temperature": 0, "num_predict": 200},
                    stream=False)
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.message.content), PERSON)
    parts = list(client.chat(model=name, messages=ASK, format=PERSON, stream=True,
                             options={"temperature": 0, "num_predict": 200}))
    assert "".join(p.message.content or "" for p in parts) == r.message.content and parts[-1].done
    g = client.generate(model=name, prompt="Give a color and its hex code as JSON.", format="json",
                        options={"temperature": 0, "num_predict": 300}, stream=False)
    assert g.done_reason == "stop" and isinstance(json.loads(g.response), dict)
    cut = client.chat(model=name, messages=ASK, format=PERSON, options={"num_predict": 4}, stream=False)
    assert cut.done_reason == "length"

    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=name, messages=ASK, format={"type": "strin"}, stream=False)
    assert e.value.status_code == 400 and e.value.error.startswith(
        "invalid format: failed to compile JSON schema: Invalid type: strin")
    raw = httpx.post(smol.url + "/api/chat", json={"model": name, "messages": ASK, "format": "yaml"}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"] == (
        'format must be "json" or a JSON schema object, got string "yaml"')
