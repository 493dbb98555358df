"""A bundle's chat template is code from the bundle run on messages from a client: it must not pin a CPU,
exhaust memory, crash the CLI with a traceback or the server with a 500, or keep the server from stopping."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.errors import GenerationError, PromptTooLong
from edgekit.runtime.bundle import read_manifest, write_manifest
from edgekit.runtime.text import TextCodec

HI = [{"role": "user", "content": "hi"}]
LOOPS = {
    "nested ranges": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "one range reused": "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% for c in r %}{% endfor %}"
                        "{% endfor %}{% endfor %}",
    "nested macro calls": "{% macro f(n) %}{% for i in range(100000) %}{{ f(n + 1) if n < 3 else '' }}{% endfor %}"
                          "{% endmacro %}{{ f(0) }}",
}
# Each would allocate gigabytes (or compute for minutes in C) if it ran.
HUGE = {
    "string repeat": ("{{ 'x' * 3000000000 }}", "a repeated value would be 3000000000 long"),
    "tojson indent": ("{{ messages | tojson(indent=300000000) }}", "larger than the output limit"),
    "center filter": ("{{ 'x' | center(1000000000) }}", "larger than the output limit"),
    "center method": ("{{ 'x'.center(1000000000) }}", "larger than the output limit"),
    "percent format": ("{{ '%1000000000s' % 'x' }}", "format width 1000000000"),
    "format filter": ("{{ '%1000000000s' | format('x') }}", "format width 1000000000"),
    "str.format": ("{{ '{:>1000000000}'.format(1) }}", "format width 1000000000"),
    "power": ("{{ 7 ** 100000000 }}", "bits is not allowed"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "a joined string would be"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", "a sum of values would be"),
    "replace": ("{{ ('a' * 10000) | replace('a', 'b' * 10000) }}", "a replaced string would be"),
    "join": ("{% set a = 'x' * 10000000 %}{{ ([a] * 100) | join }}", "longer than the output limit"),
    "squaring": ("{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
                 "bits is not allowed"),
}


@pytest.fixture(scope="module")
def tokenizer_json(tiny_bundle) -> str:
    return (tiny_bundle / "tokenizer.json").read_text()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_a_template_that_never_ends_is_stopped_at_the_deadline(tokenizer_json, name):
    codec = TextCodec(tokenizer_json, LOOPS[name], {})
    codec.render_seconds = 0.5
    started = time.monotonic()
    with pytest.raises(GenerationError, match=r"^the bundle's chat template was stopped on these messages: it ran "
                                              r"longer than 0\.5s; fix or replace the bundle's chat_template\.jinja$"):
        codec.render(HI)
    assert time.monotonic() - started < 30   # it would run for hours; not a timing check of the limit itself


@pytest.mark.parametrize("name", sorted(HUGE))
def test_a_template_that_would_exhaust_memory_is_refused_before(tokenizer_json, name):
    source, reason = HUGE[name]
    before = _peak_mib()
    with pytest.raises(GenerationError, match="^the bundle's chat template was stopped on these messages: ") as info:
        TextCodec(tokenizer_json, source, {}).render(HI)
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert _peak_mib() - before < 400   # the limit is 16 Mi characters: never the gigabytes asked for


@pytest.mark.parametrize("source, text", [
    ("{{ 1/0 }}", "(ZeroDivisionError: division by zero)"),
    ("{{ messages[0].content + 5 }}", "(TypeError: "),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "(RecursionError: maximum recursion depth exceeded"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "(SecurityError: "),
])
def test_every_template_failure_is_the_typed_one_line_error(tokenizer_json, source, text):
    with pytest.raises(GenerationError, match=r"^the chat template failed on these messages ") as info:
        TextCodec(tokenizer_json, source, {}).render(HI)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_output_is_cut_at_max_chars_before_it_is_built(tokenizer_json):
    codec = TextCodec(tokenizer_json, "{% for m in messages %}{{ m.content }}{% endfor %}", {})
    messages = [{"role": "user", "content": "x" * 1000}] * 50
    assert len(codec.render(messages, max_chars=50_000)) == 50_000
    with pytest.raises(PromptTooLong, match="more than 49999 characters") as info:
        codec.render(messages, max_chars=49_999)
    assert info.value.limit == 49_999


def test_real_templates_render_as_plain_jinja_does(tiny_bundle, smollm2_bundle):
    """The limits change nothing for a real template: same text as jinja2's sandbox renders (transformers')."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b> & \"you\""},
                    {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"},
                    {"role": "user", "content": "Again " * 300}]
    for bundle in (tiny_bundle, smollm2_bundle):
        m = read_manifest(bundle)
        source = (bundle / "chat_template.jinja").read_text()
        special = m.tokenizer
        codec = TextCodec((bundle / "tokenizer.json").read_text(), source, special)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False, **kw)
        plain = env.from_string(source)
        for messages in (conversation[1:2], conversation, conversation[:3]):
            want = plain.render(messages=messages, add_generation_prompt=True, bos_token=special.get("bos_token") or "",
                                eos_token=special.get("eos_token") or "", raise_exception=None)
            assert codec.render(messages) == want


# ----- the CLI and the server with such a bundle -----------------------------------------------------------------
def _with_template(bundle: Path, dest: Path, source: str) -> Path:
    import shutil

    shutil.copytree(bundle, dest)
    (dest / "chat_template.jinja").write_text(source)
    data = read_manifest(dest).to_dict()
    data.pop("files")
    write_manifest(dest, data)
    return dest


def test_cli_prints_one_line_for_a_failing_template(tiny_bundle, tmp_path):
    from edgekit.cli import cli

    broken = _with_template(tiny_bundle, tmp_path / "broken", "{{ 1/0 }}")
    result = CliRunner().invoke(cli, ["run", str(broken), "hi", "-n", "2"], prog_name="edgekit")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: the chat template failed on these messages (ZeroDivisionError: division "
                                     "by zero)")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_server_answers_400_for_failing_templates_and_stops_while_one_loops(tiny_bundle, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import Server

    looping = _with_template(tiny_bundle, tmp_path / "looping",
                             "{% if messages[0].content == 'loop' %}" + LOOPS["nested ranges"] + "{% endif %}"
                             "{{ 1/0 if messages[0].content == 'divide' else '' }}<|user|>{{ messages[0].content }}")
    server = Server(looping, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "divide"}]})
            assert r.status_code == 400 and "ZeroDivisionError: division by zero" in r.json()["error"]["message"]
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "loop"}]})
            assert r.status_code == 400
            assert "it ran longer than 5s" in r.json()["error"]["message"]
            ok = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
            assert ok.status_code == 200
        # SIGTERM while a rendering loops: the server still exits (the render ends at its deadline).
        looper = subprocess.Popen([sys.executable, "-c", "import httpx, sys; httpx.post(sys.argv[1], json={'messages': "
                                   "[{'role': 'user', 'content': 'loop'}]}, timeout=60)",
                                   server.url + "/v1/chat/completions"])
        time.sleep(1.0)
        assert server.stop(timeout=30) == 0, server.output()
        assert "edgekit serve: stopped" in server.output()
        looper.wait(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
