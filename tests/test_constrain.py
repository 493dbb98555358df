"""Constrained decoding (runtime/constrain.py): the grammar parts against the real tokenizers (SmolLM2's, the
real R1-Distill-Qwen-7B's), JSON schemas on the real SmolLM2 (every answer parsed and validated with the
``jsonschema`` package), the R1 forms on the tiny R1-style bundle, and what the runtime imports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from edgekit.errors import FormatError  # noqa: E402
from edgekit.runtime.answer_format import AnswerFormat, Choice, Json, Literal, Repeat, Seq, Text, json_answer  # noqa: E402

SCHEMAS = {
    "required_and_bounds": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5}},
        "required": ["name", "age", "height_m"], "additionalProperties": False},
    "enum_and_boolean": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "is_primary": {"type": "boolean"}},
        "required": ["color", "is_primary"], "additionalProperties": False},
    "nested": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "location": {"type": "object",
                                    "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                   "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                                    "required": ["lat", "lon"], "additionalProperties": False}},
        "required": ["city", "location"], "additionalProperties": False},
    "array_bounds": {
        "type": "object",
        "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "minItems": 2, "maxItems": 4}},
        "required": ["fruits"], "additionalProperties": False},
    "array_of_objects": {
        "type": "object",
        "properties": {"steps": {"type": "array", "minItems": 1, "maxItems": 3,
                                 "items": {"type": "object",
                                           "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                                          "text": {"type": "string", "maxLength": 30}},
                                           "required": ["n", "text"], "additionalProperties": False}}},
        "required": ["steps"], "additionalProperties": False},
    "defs_and_ref": {
        "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                          "legs": {"type": "integer", "minimum": 0,
                                                                   "maximum": 4}},
                          "required": ["kind", "legs"], "additionalProperties": False}},
        "type": "object", "properties": {"pet": {"$ref": "#/$defs/pet"}}, "required": ["pet"],
        "additionalProperties": False},
}
PROMPTS = {
    "required_and_bounds": "Describe a person as JSON with name, age and height in meters.",
    "enum_and_boolean": "Pick a color and say whether it is a primary color, as JSON.",
    "nested": "Give a city and its latitude and longitude as JSON.",
    "array_bounds": "List a few fruits as JSON.",
    "array_of_objects": "Give the steps to make tea as JSON.",
    "defs_and_ref": "Describe a pet as JSON.",
}
# greedy; temperature with top-k/top-p; high temperature with repetition penalty and min-p
SAMPLING = [dict(temperature=0.0), dict(temperature=0.7, top_k=40, top_p=0.9, seed=1),
            dict(temperature=1.2, repetition_penalty=1.2, min_p=0.05, seed=2)]


def _codec(reader):
    from edgekit.runtime.text import TextCodec

    return TextCodec(reader.tokenizer_json(), reader.chat_template(), reader.special_tokens())


@pytest.fixture(scope="module")
def smol_codec(smollm2_gguf):
    from edgekit.sources.gguf import GGUFReader

    return _codec(GGUFReader(smollm2_gguf))


@pytest.fixture(scope="module")
def r1_codec(r1_gguf):
    from edgekit.sources.gguf import GGUFReader

    return _codec(GGUFReader(r1_gguf))


def _walk(fmt, codec, vocab, eos, ids, *, in_reasoning=False, reasoning_texts=None):
    """Drive a Guide over ``ids`` as the loop does; returns (index of the first token the mask refused or
    len(ids), guide). The logits are all zero, so "allowed" is "not -inf"."""
    from edgekit.runtime.constrain import Guide
    from edgekit.runtime.reasoning import ReasoningSplitter

    guide = Guide(fmt, codec, vocab, eos, in_reasoning=in_reasoning)
    splitter = ReasoningSplitter(in_reasoning)
    detok = codec.stream(skip_special_tokens=True)
    for i, t in enumerate(ids):
        masked = guide.mask(np.zeros(vocab, dtype=np.float32), splitter.in_reasoning)
        if not np.isfinite(masked[t]):
            return i, guide
        text = detok.push(t)
        splitter.feed(text)
        guide.advance(t, text)
    return len(ids), guide


def _ids(codec, text):
    return codec.encode(text, add_special_tokens=False)


# ----- grammar parts, on the real tokenizers -----------------------------------------------------------------
def test_parts_accept_what_they_describe_and_refuse_the_rest(smol_codec):
    V, EOS = 49152, {2}
    c = smol_codec

    def walk(fmt, text):
        return _walk(fmt, c, V, EOS, _ids(c, text) if isinstance(text, str) else text)

    yes_no = AnswerFormat(Seq(Literal("Answer: "), Choice(Literal("yes"), Literal("no"))))
    n, g = walk(yes_no, "Answer: no")
    assert n == len(_ids(c, "Answer: no")) and g.complete
    n, g = walk(yes_no, "Answer: maybe")
    assert n < len(_ids(c, "Answer: maybe")) and not g.complete

    rep = AnswerFormat(Repeat(Literal("ab"), 2, 3))
    for k, ok in ((1, False), (2, True), (3, True)):
        n, g = walk(rep, "ab" * k)
        assert n == len(_ids(c, "ab" * k)) and g.complete is ok
    n, _ = walk(rep, "ab" * 4)
    assert n < len(_ids(c, "ab" * 4))

    # free text up to a stop string, then the literal that starts with it, then JSON (the tool-call shape)
    call = {"type": "object", "properties": {"name": {"const": "get_weather"}}, "required": ["name"]}
    tool = AnswerFormat(Choice(Text(), Seq(Text(stop=("<tool_call>",)), Literal("<tool_call>"), Json(call),
                                           Literal("</tool_call>"))))
    text = 'Let me check <tool call <tool_call>{"name": "get_weather"}</tool_call>'
    n, g = walk(tool, text)
    assert n == len(_ids(c, text)) and g.complete
    n, g = walk(tool, "Just an answer, no <tool_ call.")
    assert n == len(_ids(c, "Just an answer, no <tool_ call.")) and g.complete
    only_call = AnswerFormat(Seq(Text(stop=("<tool_call>",)), Literal("<tool_call>"), Json(call)))
    bad_json = 'x <tool_call>{"name": "get_time"}'    # (free text, Choice's first part, would take it)
    n, _ = walk(only_call, bad_json)
    assert n < len(_ids(c, bad_json))
    n, g = walk(only_call, "no call at all")
    assert n == len(_ids(c, "no call at all")) and not g.complete   # the call must still come

    # a literal holding a special token takes that token, never its spelling in text pieces
    special = AnswerFormat(Seq(Literal("<|im_start|>assistant"), Text(stop=("\n",))))
    spelled = [t for t in _ids(c, "<|im_start|>")]
    assert spelled == [1]
    n, g = walk(special, [1, *_ids(c, "assistant")])
    assert n == 1 + len(_ids(c, "assistant")) and g.complete
    pieces = c.tokenizer.encode("<|im_start", add_special_tokens=False).ids
    n, _ = walk(special, pieces)
    assert n == 0


def test_r1_tokenizer_special_literals_and_both_template_forms(r1_codec):
    from edgekit.runtime.constrain import vocabulary

    V, EOS = 152064, {151643}
    c = r1_codec
    v = vocabulary(c, V, EOS)
    think, close, call = (c.tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>"))
    assert v.think_id == think and v.specials["<tool_call>"] == call
    schema = SCHEMAS["enum_and_boolean"]
    answer = _ids(c, '{"color": "red", "is_primary": true}')

    # the real 7B template does not open the thought: the model may open it, think freely, then answer
    thought = _ids(c, "The user wants {{{ not JSON at all ]]] ")
    n, g = _walk(json_answer(schema), c, V, EOS, [think, *thought, close, *_ids(c, "\n\n"), *answer])
    assert n == 2 + len(thought) + len(_ids(c, "\n\n")) + len(answer) and g.complete
    # ... or answer at once; but not with free text
    n, g = _walk(json_answer(schema), c, V, EOS, answer)
    assert n == len(answer) and g.complete
    assert _walk(json_answer(schema), c, V, EOS, _ids(c, "Sure"))[0] == 0
    # the template that opens the thought (prompt ends with <think>\n): end-of-sequence cannot end the thought
    n, g = _walk(json_answer(schema), c, V, EOS, [*thought, 151643], in_reasoning=True)
    assert n == len(thought) and not g.complete
    # an answer that breaks the schema after the thought is refused where it breaks
    wrong = _ids(c, '{"color": "pink"')
    n, _ = _walk(json_answer(schema), c, V, EOS, [*thought, close, *wrong], in_reasoning=True)
    assert len(thought) + 1 < n < len(thought) + 1 + len(wrong)

    # Qwen's <tool_call> is a special token in this vocabulary: the literal is that token
    fmt = AnswerFormat(Seq(Text(stop=("<tool_call>",)), Literal("<tool_call>\n"), Json({"type": "object"}),
                           Literal("\n</tool_call>")))
    ids = [*_ids(c, "I will call it."), call, *_ids(c, '\n{"a": 1}\n'), c.tokenizer.token_to_id("</tool_call>")]
    n, g = _walk(fmt, c, V, EOS, ids)
    assert n == len(ids) and g.complete


def test_bad_formats_name_the_field(smol_codec):
    from edgekit.runtime.constrain import check

    def err(fmt) -> FormatError:
        with pytest.raises(FormatError) as e:
            check(fmt, smol_codec, 49152, {2})
        return e.value

    name = "response_format.json_schema.schema"
    e = err(json_answer(["not", "an", "object"], name=name))
    assert e.field == name and str(e) == f"invalid {name}: a JSON schema must be an object, got array"
    e = err(json_answer({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, name=name))
    assert e.field == name and "Pointer '/$defs/missing' does not exist" in str(e)
    assert "Unimplemented keys" in str(err(json_answer({"not": {"type": "string"}}, name=name)))
    assert "Invalid type: strin" in str(err(json_answer({"type": "strin"}, name=name)))
    assert "minLength (3) is greater than maxLength (1)" in str(
        err(json_answer({"type": "string", "minLength": 3, "maxLength": 1}, name=name)))
    assert "a Choice needs at least one part" in str(err(AnswerFormat(Choice(), name="tools")))
    assert "a Literal needs non-empty text" in str(err(AnswerFormat(Literal(""))))
    assert "Repeat bounds" in str(err(AnswerFormat(Repeat(Literal("a"), 3, 2))))
    assert "Text stop must be a tuple of non-empty strings" in str(err(AnswerFormat(Text(stop="x"))))
    e = err({"type": "object"})
    assert e.field == "answer_format" and "use json_answer(schema)" in str(e)


def test_a_tokenizer_the_library_cannot_map_is_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from edgekit.errors import FormatUnavailable
    from edgekit.runtime.constrain import check
    from edgekit.runtime.text import TextCodec

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()   # no decoder: token text cannot be turned back into bytes
    with pytest.raises(FormatUnavailable) as e:
        check(json_answer(), TextCodec(tok.to_str(), None, {"eos_token_ids": [3]}), 4, {3})
    assert str(e.value) == (
        "the constraint library cannot map this bundle's tokenizer (can't determine decoder type: None): structured "
        "output is not available for this model; send the request without a format, or use a bundle with a "
        "byte-level BPE or sentencepiece tokenizer")


# ----- the real SmolLM2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_bundle):
    from edgekit.runtime.model import load

    return load(smollm2_bundle)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_smollm2_answers_parse_and_validate(smol, name):
    schema = SCHEMAS[name]
    messages = [{"role": "user", "content": PROMPTS[name]}]
    for sampling in SAMPLING:
        r = smol.generate(messages=messages, answer_format=json_answer(schema), max_new_tokens=300, **sampling)
        assert r.finish_reason == "stop" and r.format_complete is True, (sampling, r.answer)
        jsonschema.validate(json.loads(r.answer), schema)
        assert r.text == r.answer and r.reasoning == ""


def test_smollm2_without_a_format_is_not_json_and_the_length_case(smol):
    messages = [{"role": "user", "content": PROMPTS["required_and_bounds"]}]
    free = smol.generate(messages=messages, max_new_tokens=40)
    assert free.format_complete is None
    with pytest.raises(json.JSONDecodeError):   # what the constraint changes: the free answer is prose
        json.loads(free.answer)
    cut = smol.generate(messages=messages, answer_format=json_answer(SCHEMAS["required_and_bounds"]),
                        max_new_tokens=6)
    assert cut.finish_reason == "length" and cut.format_complete is False and cut.completion_tokens == 6
    assert cut.answer.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.answer)
    # streamed: the deltas are the answer
    events = list(smol.stream(messages=messages, answer_format=json_answer(SCHEMAS["enum_and_boolean"])))
    done = events[-1].result
    assert "".join(e.text for e in events if e.kind == "answer") == done.answer and done.format_complete
    jsonschema.validate(json.loads(done.answer), SCHEMAS["enum_and_boolean"])


# ----- the R1 forms, on the tiny R1-style bundle (its template ends the prompt with <think>\n) ----------------
@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    from edgekit.runtime.model import load

    return load(tiny_bundle)


HI = [{"role": "user", "content": "hi"}]
SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9},
                                          "tag": {"enum": ["a", "b"]}},
         "required": ["ok", "n", "tag"], "additionalProperties": False}


def test_r1_thought_is_free_and_the_budget_closes_it_then_the_answer_is_constrained(tiny):
    for seed in range(4):
        r = tiny.generate(messages=HI, answer_format=json_answer(SMALL), thinking_budget=12, temperature=1.0,
                          seed=seed, max_new_tokens=120)
        assert r.thinking_budget_hit and r.reasoning_tokens == 12 and r.reasoning
        assert r.finish_reason == "stop" and r.format_complete, r.answer
        jsonschema.validate(json.loads(r.answer), SMALL)
    # the thought is not masked: greedy, its tokens equal those of the same request without a format
    with_fmt = tiny.generate(messages=HI, answer_format=json_answer(SMALL), thinking_budget=12, max_new_tokens=80,
                             temperature=0)
    without = tiny.generate(messages=HI, thinking_budget=12, max_new_tokens=80, temperature=0)
    assert with_fmt.tokens[:12] == without.tokens[:12] and with_fmt.reasoning == without.reasoning
    assert with_fmt.answer != without.answer
    jsonschema.validate(json.loads(with_fmt.answer), SMALL)
    # no budget for thinking at all: the answer comes at once, constrained
    r = tiny.generate(messages=HI, answer_format=json_answer(SMALL), thinking_budget=0, max_new_tokens=60,
                      temperature=0)
    assert r.format_complete and r.thinking_budget_hit
    jsonschema.validate(json.loads(r.answer), SMALL)


def test_r1_length_mid_thought_or_mid_answer_is_incomplete(tiny):
    r = tiny.generate(messages=HI, answer_format=json_answer(SMALL), max_new_tokens=10)
    assert r.finish_reason == "length" and r.format_complete is False and r.answer == ""
    r = tiny.generate(messages=HI, answer_format=json_answer(SMALL), thinking_budget=4, max_new_tokens=8)
    assert r.finish_reason == "length" and r.format_complete is False
    assert r.answer.startswith("{") and not r.answer.endswith("}")


def test_r1_model_may_open_the_thought_itself(tiny):
    # a raw prompt does not open the thought (as the real 7B GGUF's template): <think> or the answer may come
    for seed in range(3):
        r = tiny.generate(prompt="<|user|>hi<|assistant|>", answer_format=json_answer(SMALL), temperature=1.0,
                          seed=seed, thinking_budget=6, max_new_tokens=100)
        assert r.finish_reason == "stop" and r.format_complete
        jsonschema.validate(json.loads(r.answer), SMALL)


# ----- imports ---------------------------------------------------------------------------------------------
def test_the_runtime_imports_the_library_only_for_a_format(tiny_bundle):
    code = f"""
import sys
from edgekit.runtime.model import load
import edgekit.server.schemas, edgekit.runtime.answer_format
m = load({str(tiny_bundle)!r})
m.generate(messages=[{{"role": "user", "content": "hi"}}], max_new_tokens=3)
assert not any(k.split(".")[0] == "llguidance" for k in sys.modules), "imported without a format"
from edgekit.runtime.answer_format import json_answer
r = m.generate(messages=[{{"role": "user", "content": "hi"}}], max_new_tokens=3, answer_format=json_answer())
assert "llguidance" in sys.modules
sys.modules["llguidance"] = None       # as if not installed
import edgekit.runtime.constrain as c
c._vocabularies.clear()
from edgekit.errors import FormatUnavailable
try:
    m.generate(messages=[{{"role": "user", "content": "hi"}}], answer_format=json_answer())
except FormatUnavailable as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("structured output (answer_format, response_format, format) needs the "
                                  "llguidance package, which is not installed: pip install 'edgekit[structured]'")
