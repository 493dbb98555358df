"""Prefix reuse: a request keeps the KV rows it shares with the previous sequence, and the output is token for
token what a fresh prefill gives (both dialects, onnxruntime and the TensorRT backend through the stand-in)."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import standin

from edgekit.build import QuantOptions, build
from edgekit.build.target import load_target
from edgekit.engine import builder as eb
from edgekit.runtime.generate import GenerationRequest, run
from edgekit.runtime.model import load
from edgekit.runtime.prefix import common_prefix, prefill_bounds
from edgekit.runtime.sampling import SamplingParams
from edgekit.runtime.trt_backend import open_engine_decoder

NEW = 6


def _generate(model, ids, *, reuse, new=NEW, chunk=4, cancel=None):
    request = GenerationRequest(prompt_ids=list(ids), sampling=SamplingParams(), max_new_tokens=new, ignore_eos=True)
    for event in run(model.decoder, model.codec, request, prefill_chunk=chunk, eos_ids=model.eos_ids, reuse=reuse,
                     cancel=cancel):
        if event.kind == "done":
            return event.result


class _Counting:
    """Counts the tokens each step() runs through the model."""

    def __init__(self, decoder):
        self.decoder, self.fed = decoder, 0
        self._step = decoder.step

    def __enter__(self):
        def step(tokens):
            self.fed += int(np.asarray(tokens).size)
            return self._step(tokens)
        self.decoder.step = step
        return self

    def __exit__(self, *exc):
        del self.decoder.step


def _turns(model):
    """A chat as token ids: a shared 'system prompt', then questions; turn 3 drops the end of the previous answer
    (as R1 templates drop the thought), so the kept prefix ends inside the history."""
    system = [(7 * i + 3) % 50 + 10 for i in range(13)]
    return system, [[21, 22, 23], [31, 32], [41, 42, 43, 44]]


def _converse(model, reuse):
    system, questions = _turns(model)
    history, out = list(system), []
    for i, q in enumerate(questions):
        ids = history + q
        with _Counting(model.decoder) as c:
            r = _generate(model, ids, reuse=reuse)
        out.append((ids, r.tokens, r.cached_tokens, c.fed))
        history = ids + (r.tokens[:2] if i == 1 else r.tokens)    # turn 3's prompt drops part of answer 2
    return out


def _check_chat(model):
    model.decoder.reset()
    fresh = _converse(model, reuse=False)
    model.decoder.reset()
    reused = _converse(model, reuse=True)
    assert [t for _, t, _, _ in reused] == [t for _, t, _, _ in fresh]
    assert all(len(t) == NEW for _, t, _, _ in fresh)
    (ids1, t1, c1, f1), (ids2, t2, c2, f2), (ids3, t3, c3, f3) = reused
    assert c1 == 0 and f1 == len(ids1) + NEW - 1
    # the second prompt extends prompt 1 + answer 1: the prompt's prefill rows are kept, answer 1's rows (written
    # by one-token decode steps, other kernels) are prefilled again
    assert c2 == len(ids1) and f2 == len(ids2) - c2 + NEW - 1
    assert common_prefix(ids2 + t2[:-1], ids3) == len(ids2) + 2 and c3 == len(ids2)
    assert f3 == len(ids3) - c3 + NEW - 1
    assert all(c == 0 for _, _, c, _ in fresh)
    assert [f for *_, f in fresh] == [len(ids) + NEW - 1 for ids, *_ in fresh]


def _check_edges(model):
    """Divergence at token 0, a strict extension, a shorter prompt, the same prompt, cancellation, an error."""
    system, questions = _turns(model)
    base = system + questions[0]
    model.decoder.reset()
    want = {name: _generate(model, ids, reuse=False).tokens for name, ids in
            (("base", base), ("other", [5] + base[1:]), ("longer", base + [30, 31, 32]), ("shorter", base[:7]))}
    _generate(model, base, reuse=True)
    first = _generate(model, [5] + base[1:], reuse=True)                # differs at token 0
    assert first.cached_tokens == 0 and first.tokens == want["other"]
    _generate(model, base, reuse=True)
    r = _generate(model, base + [30, 31, 32], reuse=True)              # strict extension of the prompt
    assert r.cached_tokens == len(base) and r.tokens == want["longer"]
    r = _generate(model, base[:7], reuse=True)                          # shorter than what is cached
    assert r.cached_tokens == 5 and r.tokens == want["shorter"]
    r = _generate(model, base[:7], reuse=True)                          # the same prompt: its last 2 tokens run again
    assert r.cached_tokens == 5 and r.tokens == want["shorter"]
    r = _generate(model, base, reuse=True)                              # the prompt's rows, not its answer's
    assert common_prefix(base[:7] + want["shorter"][:-1], base) >= 7 and r.cached_tokens == 7
    assert r.tokens == want["base"]

    cancel = threading.Event()                                          # cancelled after the first streamed event
    request = GenerationRequest(prompt_ids=base + [30, 31, 32], sampling=SamplingParams(), max_new_tokens=NEW,
                                ignore_eos=True)
    events = run(model.decoder, model.codec, request, prefill_chunk=4, eos_ids=model.eos_ids, reuse=True,
                 cancel=cancel)
    for event in events:
        cancel.set()
        if event.kind == "done":
            assert event.result.finish_reason == "cancelled"
    assert _generate(model, base, reuse=True).tokens == want["base"]
    events = run(model.decoder, model.codec, request, prefill_chunk=4, eos_ids=model.eos_ids, reuse=True)
    next(iter(events))                                                  # a client that goes away mid-stream
    events.close()
    assert _generate(model, base + [30, 31, 32], reuse=True).tokens == want["longer"]

    calls = {"n": 0}
    real = type(model.decoder)._run

    def failing(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the device failed mid-step")
        return real(self, tokens)

    type(model.decoder)._run = failing
    try:
        with pytest.raises(RuntimeError, match="mid-step"):
            _generate(model, base + [30, 31, 32, 33], reuse=True)
    finally:
        type(model.decoder)._run = real
    assert model.decoder.position == 0 and model.decoder.cached == []
    r = _generate(model, base, reuse=True)
    assert r.cached_tokens == 0 and r.tokens == want["base"]


def test_prefill_bounds_never_end_with_a_one_token_chunk():
    assert prefill_bounds(0, 513, 256) == [0, 256, 511, 513]
    assert prefill_bounds(0, 512, 256) == [0, 256, 512]
    assert prefill_bounds(0, 1, 256) == [0, 1] and prefill_bounds(7, 9, 256) == [7, 9]
    assert prefill_bounds(0, 3, 2) == [0, 2, 3]                         # chunk 2 cannot avoid it


def test_common_prefix():
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([9, 2], [1, 2]) == 0


def test_ort_dialect_reuse_is_token_identical(tiny_bundle):
    model = load(tiny_bundle)
    assert model.decoder.dialect == "ort" and model.prefix_reuse
    _check_chat(model)
    _check_edges(model)
    off = load(tiny_bundle, prefix_reuse=False)                     # the Python API's switch
    assert [off.generate("the same prompt", max_new_tokens=3).cached_tokens for _ in range(2)] == [0, 0]
    assert [model.generate("the same prompt", max_new_tokens=3).cached_tokens > 0 for _ in range(2)][1]


@pytest.fixture(scope="module")
def trt_bundle(tiny_qwen2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix-trt") / "b"
    build(tiny_qwen2_dir, load_target("orin-nano"), output=folder, precision="int4", context=64,
          quant=QuantOptions(method="rtn"))
    engine = tmp_path_factory.mktemp("prefix-trt-engine") / "b"
    shutil.copytree(folder, engine)
    eb.build_bundle_engine(engine, trt=standin.make_trt(), probe=standin.gpu_probe())
    return engine


def test_tensorrt_dialect_on_onnxruntime_reuse_is_token_identical(trt_bundle):
    model = load(trt_bundle, backend="onnxruntime-cpu")
    assert model.decoder.dialect == "tensorrt"
    _check_chat(model)
    _check_edges(model)


def test_tensorrt_backend_reuse_is_token_identical(trt_bundle):
    model = load(trt_bundle, backend="onnxruntime-cpu")
    cuda = standin.FakeCuda()
    model.decoder = open_engine_decoder(model.manifest, capacity=64, probe=standin.gpu_probe(),
                                        trt=standin.make_trt(cuda=cuda), cuda=cuda)
    _check_chat(model)
    _check_edges(model)
    model.close()


def test_smollm2_chat_is_identical_with_and_without_reuse(smollm2_bundle):
    model = load(smollm2_bundle)
    system = {"role": "system", "content": "You are a smart-home assistant. The house has a kitchen light (on), a "
                                           "front door lock (locked) and a thermostat set to 21 degrees."}
    questions = ["Is the kitchen light on?", "And the front door?", "What is the thermostat set to?"]

    def chat(reuse):
        model.prefix_reuse = reuse
        history, results = [system], []
        for q in questions:
            history.append({"role": "user", "content": q})
            r = model.generate(messages=history, max_new_tokens=16, temperature=0.0)
            results.append(r)
            history.append({"role": "assistant", "content": r.answer})
        return results

    fresh, reused = chat(False), chat(True)
    assert [r.tokens for r in reused] == [r.tokens for r in fresh]
    assert all(r.cached_tokens == 0 for r in fresh)
    # the first reused turn follows the fresh run's last sequence, which shares the system prompt with it
    assert all(r.cached_tokens > 40 for r in reused)
    assert reused[2].cached_tokens > reused[1].cached_tokens


def test_smollm2_int4_reused_logits_equal_a_fresh_prefill_bit_for_bit(smollm2_gguf, tmp_path):
    """INT4 (MatMulNBits, int8 activations): a token run alone and inside a prefill chunk give logits up to ~0.5
    apart, so only prefill rows may be kept; then the logits after reuse are exactly those of a fresh prefill."""
    from edgekit.runtime.prefix import reuse

    model = load(build(smollm2_gguf, load_target("cpu"), output=tmp_path / "b", precision="int4",
                       context=512).bundle)
    history = [{"role": "system", "content": "You run a house. Lights: " + ", ".join(
        f"room {i} {'on' if i % 3 else 'off'}" for i in range(40))}, {"role": "user", "content": "Is room 5 on?"}]
    ids1 = model.codec.encode(model.render(messages=history)[0], add_special_tokens=False)
    answer = _generate(model, ids1, reuse=True, new=12, chunk=64).tokens
    history += [{"role": "assistant", "content": model.codec.decode(answer)}, {"role": "user", "content": "Thanks"}]
    ids2 = model.codec.encode(model.render(messages=history)[0], add_special_tokens=False)
    assert common_prefix(ids1 + answer, ids2) > len(ids1) + 2     # the answer's rows are there to be (wrongly) kept

    def prefill(start):
        bounds = prefill_bounds(start, len(ids2), 64)
        return [np.array(model.decoder.step(np.array(ids2[a:b]))) for a, b in zip(bounds, bounds[1:])][-1]

    kept = reuse(model.decoder, ids2)
    assert kept == len(ids1)
    reused = prefill(kept)
    model.decoder.reset()
    assert np.array_equal(reused, prefill(0))
