"""The on-device runtime on a tiny real bundle: generation, sampling, reasoning, budget, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from edgekit.errors import BackendUnavailable, BudgetExceeded, BundleError, GenerationError
from edgekit.runtime.memory import available_memory
from edgekit.runtime.model import load
from edgekit.runtime.reasoning import ReasoningSplitter, StopMatcher

HELLO = [{"role": "user", "content": "hello robot"}]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


def test_greedy_matches_transformers(model, tiny_qwen2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    ids = model.codec.encode(model.codec.render(HELLO), add_special_tokens=False)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    result = model.generate(messages=HELLO, max_new_tokens=24, temperature=0)
    assert result.tokens == out[0, len(ids):].tolist()
    assert result.prompt_tokens == len(ids)
    assert result.completion_tokens == 24 and result.finish_reason == "length"


def test_same_seed_same_tokens_and_seed_matters(model):
    kw = dict(messages=HELLO, max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = model.generate(seed=7, **kw).tokens
    assert a == model.generate(seed=7, **kw).tokens
    assert any(model.generate(seed=s, **kw).tokens != a for s in (8, 9, 10))


def test_top_k_one_is_greedy(model):
    greedy = model.generate(messages=HELLO, max_new_tokens=12, temperature=0).tokens
    assert model.generate(messages=HELLO, max_new_tokens=12, temperature=1.5, top_k=1, seed=3).tokens == greedy


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "invalid temperature -1"),
    (dict(top_p=0), "invalid top_p 0"),
    (dict(top_p=1.5), "invalid top_p 1.5"),
    (dict(top_k=-2), "invalid top_k -2"),
    (dict(min_p=1.0), "invalid min_p 1.0"),
    (dict(repetition_penalty=0), "invalid repetition_penalty 0"),
    (dict(seed=-1), "invalid seed -1"),
    (dict(max_new_tokens=0), "invalid max_new_tokens 0"),
    (dict(thinking_budget=-3), "invalid thinking_budget -3"),
])
def test_invalid_sampling_values_are_typed_errors(model, bad, match):
    with pytest.raises(GenerationError, match=match):
        model.generate(messages=HELLO, **bad)


def test_r1_template_output_is_reasoning_and_budget_forces_an_answer(model):
    # The tiny model's template ends the prompt with "<think>\n": everything it says is reasoning...
    free = model.generate(messages=HELLO, max_new_tokens=20, temperature=0)
    assert free.answer == "" and free.reasoning == free.text and free.reasoning_tokens == 20
    # ...until a thinking budget closes the thought and makes it answer.
    forced = model.generate(messages=HELLO, max_new_tokens=20, temperature=0, thinking_budget=5)
    assert forced.thinking_budget_hit and forced.reasoning_tokens == 5
    assert "</think>" in forced.text and forced.answer != ""
    assert forced.tokens[:5] == free.tokens[:5]


def test_stream_events_add_up_to_the_result(model):
    events = list(model.stream(messages=HELLO, max_new_tokens=30, temperature=0, thinking_budget=10))
    done = events[-1]
    assert done.kind == "done" and all(e.kind in ("reasoning", "answer") for e in events[:-1])
    assert "".join(e.text for e in events if e.kind == "reasoning") == done.result.reasoning
    assert "".join(e.text for e in events if e.kind == "answer") == done.result.answer
    # Streaming never shows a replacement character for a character whose bytes are still arriving: the
    # deltas add up to decoding all the tokens at once (a character still incomplete when generation stops
    # is dropped by the stream, and shows as U+FFFD in the one-shot decode). The random byte-level model
    # produces such split characters; the forced "</think>" would sit between their bytes, so no budget here.
    plain = list(model.stream(messages=HELLO, max_new_tokens=40, temperature=0))
    streamed = "".join(e.text for e in plain[:-1])
    whole = model.codec.decode(plain[-1].result.tokens, skip_special_tokens=True)
    assert streamed.rstrip("\ufffd") == whole.rstrip("\ufffd") and "\ufffd" in whole


def test_stop_string_truncates(model):
    full = model.generate(prompt="robot", max_new_tokens=30, temperature=0)
    stop = full.text[10:13]
    assert stop and stop in full.text
    cut = model.generate(prompt="robot", max_new_tokens=30, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_cancel_from_another_thread(model):
    cancel = threading.Event()
    seen = []
    for event in model.stream(messages=HELLO, max_new_tokens=200, temperature=0, cancel=cancel):
        seen.append(event)
        if len(seen) == 3:
            threading.Thread(target=cancel.set).start()
    result = seen[-1].result
    assert result.finish_reason == "cancelled" and result.completion_tokens < 200


def test_prompt_longer_than_context(tiny_bundle):
    small = load(tiny_bundle, max_context=32)
    long_prompt = "word " * 100
    with pytest.raises(GenerationError, match=r"the prompt has \d+ tokens but max_context is 32"):
        small.generate(prompt=long_prompt)
    result = small.generate(prompt=long_prompt, truncate=True, max_new_tokens=4, temperature=0)
    assert result.prompt_tokens + result.completion_tokens <= 32


def test_max_context_sets_the_kv_allocation_exactly(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    per_token = manifest["memory"]["kv_bytes_per_token"]
    for context in (32, 100, manifest["max_context"]):
        m = load(tiny_bundle, max_context=context)
        assert m.decoder.kv_cache_bytes == per_token * context == m.memory.kv_cache_bytes
    with pytest.raises(GenerationError, match="invalid max_context 100000"):
        load(tiny_bundle, max_context=100000)


def test_budget_below_need_raises_with_numbers(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    need = manifest["memory"]["total_bytes"]
    with pytest.raises(BudgetExceeded) as e:
        load(tiny_bundle, memory_budget=need - 1)
    assert e.value.needed_bytes == need and e.value.available_bytes == need - 1
    assert "MiB" in str(e.value) and "largest max_context that fits is" in str(e.value)
    assert 0 < e.value.max_context < manifest["max_context"]
    load(tiny_bundle, memory_budget=need)                         # exactly enough: loads
    m = load(tiny_bundle, memory_budget=need - 1, max_context=e.value.max_context)
    assert m.max_context == e.value.max_context


def test_budget_exceeded_cli_is_one_line_exit_3(tiny_bundle):
    from click.testing import CliRunner

    from edgekit.cli import cli

    r = CliRunner().invoke(cli, ["run", str(tiny_bundle), "hi", "--memory-budget", "1MiB"])
    assert r.exit_code == 3
    assert r.output.count("\n") == 1 and r.output.startswith("error: this bundle needs")


def test_available_memory_reads_cgroup_limit(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n")
    assert available_memory(tmp_path) == (8000000 * 1024, "MemAvailable in /proc/meminfo")
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text("1073741824\n")
    (cg / "memory.current").write_text("73741824\n")
    assert available_memory(tmp_path) == (1000000000, "cgroup v2 memory.max - memory.current")
    (cg / "memory.max").write_text("max\n")
    assert available_memory(tmp_path)[1] == "MemAvailable in /proc/meminfo"


def test_missing_and_tampered_bundles(tiny_bundle, copy_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load(tmp_path / "nope")
    bad = copy_bundle(tiny_bundle)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx"):
        load(bad)


def test_bundle_for_tensorrt_is_refused_on_auto(tiny_bundle, copy_bundle):
    from edgekit.runtime.bundle import read_manifest, write_manifest

    other = copy_bundle(tiny_bundle)
    manifest = read_manifest(other).to_dict()
    manifest.update(backend="tensorrt", target={"name": "orin-nano-8gb", "kind": "jetson", "compute_capability": "8.7"})
    write_manifest(other, manifest)
    with pytest.raises(BackendUnavailable, match="built for TensorRT"):
        load(other)
    with pytest.raises(BackendUnavailable, match="unknown backend 'vulkan'"):
        load(tiny_bundle, backend="vulkan")


def test_memory_stays_flat_over_1000_generations(model):
    from edgekit.runtime.bench import rss_mib

    for _ in range(50):  # warm up allocator arenas
        model.generate(messages=HELLO, max_new_tokens=4, temperature=0.8, seed=1)
    start = rss_mib()
    for i in range(1000):
        model.generate(messages=HELLO, max_new_tokens=4, temperature=0.8, seed=i)
    growth = rss_mib() - start
    assert growth < 8, f"RSS grew by {growth:.1f} MiB over 1000 generations"


def test_runtime_imports_stay_light():
    code = ("import sys, edgekit.runtime, edgekit.runtime.model, edgekit.runtime.generate; "
            "print(' '.join(m for m in ('torch', 'transformers', 'onnx', 'click', 'optimum', 'gguf', 'rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("deltas, reasoning, answer", [
    (["Let me think", " about it</th", "ink>\n\nThe answer", " is 4."], "Let me think about it", "The answer is 4."),
    (["no tags at all"], "", "no tags at all"),
    (["<think>", "hmm", "</think>", "ok"], "hmm", "ok"),
])
def test_reasoning_splitter(deltas, reasoning, answer):
    in_reasoning = not deltas[0].startswith("<think>") and reasoning != ""
    s = ReasoningSplitter(in_reasoning)
    events = [e for d in deltas for e in s.feed(d)] + s.finish()
    assert "".join(t for k, t in events if k == "reasoning") == reasoning
    assert "".join(t for k, t in events if k == "answer") == answer


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("OP and more") == ("", True)
    m = StopMatcher(["xyz"])
    assert m.feed("abx") == ("ab", False) and m.finish() == "x"


def test_graph_that_reads_weights_outside_the_bundle_is_refused(tiny_bundle, copy_bundle):
    """model.onnx names its own weight files: one pointing out of the bundle is refused before onnxruntime."""
    import onnx

    from edgekit.runtime.bundle import read_manifest, write_manifest
    from edgekit.runtime.onnx_refs import external_locations

    bad = copy_bundle(tiny_bundle)
    assert set(external_locations((bad / "model.onnx").read_bytes())) == {"model.onnx.data"}
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    next(e for e in tensor.external_data if e.key == "location").value = "../../etc/passwd"
    onnx.save(model, str(bad / "model.onnx"))
    write_manifest(bad, read_manifest(bad).to_dict())      # re-hashed: the manifest alone cannot tell
    with pytest.raises(BundleError, match=r"reads its weights from '../../etc/passwd', which is not a file"):
        load(bad)
