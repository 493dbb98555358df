"""edgekit eval and the calibration set: fidelity figures against independent computations, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.build.calibration import (
    calibration_token_batches,
    encode_prompt,
    load_calibration,
    load_samples,
    render_sample,
)
from edgekit.build.evaluate import FidelityStats, evaluate
from edgekit.errors import UserInputError


@pytest.fixture(scope="module")
def fp32_bundle(tiny_qwen2_dir, tmp_path_factory):
    """The tiny Qwen2 at fp32: the same weights as its source folder."""
    from edgekit.build import build
    from edgekit.build.target import load_target

    out = tmp_path_factory.mktemp("eval") / "tiny-fp32"
    return build(tiny_qwen2_dir, load_target("cpu"), output=out, precision="fp32", context=256).bundle


@pytest.fixture(scope="module")
def other_seed_dir(tmp_path_factory):
    """The tiny Qwen2's architecture and tokenizer with different random weights."""
    from tiny_models import make_tiny

    folder = tmp_path_factory.mktemp("tiny-qwen2-seed1")
    make_tiny("qwen2", folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


def _codec(folder):
    from edgekit.build.calibration import codec_from_reader
    from edgekit.sources import open_weights, resolve

    return codec_from_reader(open_weights(resolve(folder)))


# ----- the statistics ----------------------------------------------------------------------------
def test_fidelity_stats_match_a_direct_computation():
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 3, (70, 50)).astype(np.float32)
    out = (ref + rng.normal(0, 1, ref.shape)).astype(np.float32)
    targets = rng.integers(0, 50, 70)
    stats = FidelityStats(block=16)   # several blocks, the last one partial
    stats.add(ref, out, targets)
    s = stats.summary()

    p = np.exp(ref.astype(np.float64))
    p /= p.sum(1, keepdims=True)
    q = np.exp(out.astype(np.float64))
    q /= q.sum(1, keepdims=True)
    kl = (p * np.log(p / q)).sum(1)
    assert s["tokens"] == 70
    assert s["mean_kl"] == pytest.approx(kl.mean(), rel=1e-9)
    assert s["max_kl"] == pytest.approx(kl.max(), rel=1e-9)
    assert s["top1_agreement"] == pytest.approx((p.argmax(1) == q.argmax(1)).mean())
    assert s["perplexity"] == pytest.approx(math.exp(-np.log(q[np.arange(70), targets]).mean()), rel=1e-9)
    assert s["reference_perplexity"] == pytest.approx(math.exp(-np.log(p[np.arange(70), targets]).mean()), rel=1e-9)
    assert 0.2 < s["top1_agreement"] < 1.0 and s["mean_kl"] > 0.01  # the noise really changed something

    same = FidelityStats()
    same.add(ref, ref.copy(), targets)
    assert same.summary()["top1_agreement"] == 1.0 and abs(same.summary()["mean_kl"]) < 1e-12


# ----- evaluate() ----------------------------------------------------------------------------------
def test_fp32_bundle_agrees_with_its_own_weights(fp32_bundle, tiny_qwen2_dir, work_dir):
    r = evaluate(fp32_bundle, tiny_qwen2_dir, max_tokens=160, work_dir=work_dir)
    assert r.tokens == 160 and r.sequences >= 3 and r.text == "generated"
    assert r.top1_agreement == 1.0
    assert abs(r.mean_kl) < 1e-6 and r.max_kl < 1e-5
    assert r.perplexity == pytest.approx(r.reference_perplexity, rel=1e-4)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d   # recordable in a manifest as is
    assert d["top1_agreement"] == 1.0 and d["reference"] == str(tiny_qwen2_dir) and len(d["reference_sha256"]) == 64


def test_the_reference_export_is_reused_from_the_work_dir_and_checked(fp32_bundle, tiny_qwen2_dir, tmp_path):
    """--work-dir is an export cache (edgekit.export.cache): reused while intact, exported again when damaged."""
    def run():
        stages = []
        r = evaluate(fp32_bundle, tiny_qwen2_dir, max_tokens=16, work_dir=tmp_path,
                     progress=lambda stage, done, total: stages.append(stage))
        return r, stages

    first, stages = run()
    assert "export reference" in stages
    [entry] = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    again, stages = run()
    assert "export reference" not in stages and again.top1_agreement == first.top1_agreement == 1.0
    data = entry / "model.onnx.data"
    data.chmod(0o644)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    third, stages = run()
    assert any("discarded" in s and "model.onnx.data changed since it was stored" in s for s in stages)
    assert "export reference" in stages and third.top1_agreement == 1.0


def test_a_different_reference_gives_lower_agreement_and_positive_kl(fp32_bundle, other_seed_dir, work_dir):
    r = evaluate(fp32_bundle, other_seed_dir, max_tokens=160, work_dir=work_dir)
    assert r.tokens == 160
    assert r.top1_agreement < 0.5
    assert r.mean_kl > 0.1
    assert r.perplexity > r.reference_perplexity


def test_perplexities_match_independent_computations(fp32_bundle, tiny_qwen2_dir, work_dir):
    """The bundle's perplexity from its decoder's logits (numpy), the reference's from transformers (torch)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.runtime.model import load

    r = evaluate(fp32_bundle, tiny_qwen2_dir, max_tokens=96, work_dir=work_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    model = load(fp32_bundle)
    nll_hf, nll_bundle, n = 0.0, 0.0, 0
    for ids, start in zip(r.token_ids, r.scored_from):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()                   # (S, V)
        targets = torch.tensor(ids[start + 1:])
        nll_hf += torch.nn.functional.cross_entropy(logits[start:-1], targets, reduction="sum").item()
        model.decoder.reset()
        rows = [np.array(model.decoder.step(np.array([t])), dtype=np.float64) for t in ids[:-1]]
        z = np.stack(rows[start:])                                                  # (S - 1 - start, V)
        nll_bundle += float(np.sum(np.logaddexp.reduce(z, axis=1) - z[np.arange(len(z)), ids[start + 1:]]))
        n += len(ids) - 1 - start
    assert n == r.tokens
    assert r.reference_perplexity == pytest.approx(math.exp(nll_hf / n), rel=1e-4)
    assert r.perplexity == pytest.approx(math.exp(nll_bundle / n), rel=1e-6)


def test_text_file_is_scored_over_every_token(fp32_bundle, tiny_qwen2_dir, work_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("The robot opened the door.\n\nThen it closed the window and reported back to the hub.\n")
    r = evaluate(fp32_bundle, tiny_qwen2_dir, text=text, max_tokens=40, work_dir=work_dir)
    assert r.text == str(text) and r.scored_from == [0] * r.sequences
    assert r.tokens == 40 and r.top1_agreement == 1.0


def test_a_reference_with_another_vocabulary_is_refused(tiny_bundle, tiny_llama_dir):
    with pytest.raises(UserInputError, match="vocabulary of 300 tokens but the bundle .* has 320"):
        evaluate(tiny_bundle, tiny_llama_dir)


def test_a_reference_with_another_tokenizer_is_refused(fp32_bundle, tiny_qwen2_dir, tmp_path):
    import shutil

    other = tmp_path / "retokenized"
    shutil.copytree(tiny_qwen2_dir, other)
    doc = json.loads((other / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[65:67]          # swap the ids of two byte tokens
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserInputError, match="different tokenizer"):
        evaluate(fp32_bundle, other)


# ----- calibration -----------------------------------------------------------------------------------
def test_builtin_calibration_set():
    convs = load_calibration()
    assert 40 <= len(convs) <= 64
    text = "\n".join(m["content"] for c in convs for m in c)
    assert sum("<think>" in c[-1]["content"] for c in convs) >= 10          # reasoning-style answers
    assert all(c[-1]["role"] == "assistant" for c in convs)
    for sample in ("Schalte", "aspirateur", "¿", "机器人", "ロボット", "```python", "thermostat", "gripper"):
        assert sample in text


def test_calibration_batches_render_the_answer_after_the_generation_prompt(tiny_qwen2_dir):
    codec = _codec(tiny_qwen2_dir)
    sample = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    text, templated = render_sample(codec, sample)
    # the R1-style template opens the thought itself; the answer's own <think> is not repeated
    assert templated and text.endswith("<|assistant|><think>\nadd\n</think>\n\n4<|eos|>")
    assert text.count("<think>") == 1
    assert codec.decode(encode_prompt(codec, sample)).endswith("<|assistant|><think>\n")

    batches = calibration_token_batches(codec, max_tokens=64)
    assert len(batches) == len(load_samples()) and max(map(len, batches)) == 64
    assert all(b[0] == 256 for b in batches)                      # the template's BOS
    limited = calibration_token_batches(codec, max_tokens=64, total_tokens=100)
    assert sum(map(len, limited)) == 100 and limited[0] == batches[0]


def test_user_calibration_files(tmp_path, tiny_qwen2_dir):
    plain = tmp_path / "mine.txt"
    plain.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n", encoding="utf-8")
    assert load_samples(plain) == ["First paragraph,\nstill the first.", "Second one."]
    assert load_calibration(plain)[1] == [{"role": "user", "content": "Second one."}]
    codec = _codec(tiny_qwen2_dir)
    assert codec.decode(calibration_token_batches(codec, plain)[1]) == "<|bos|>Second one."  # raw text gets BOS

    chat = tmp_path / "mine.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n\n"
                    + json.dumps([{"role": "user", "content": "yo"}]) + "\n" + json.dumps({"text": "raw"}) + "\n")
    assert load_samples(chat) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}], "raw"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("blank.jsonl", b"\n  \n", "is empty"),
    ("weights.bin", b"\x00\x01\x02binary", "is not text"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "is not UTF-8 text"),
    ("bad.jsonl", b'{"messages": [}\n', "line 1 is not JSON"),
    ("roles.jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}\n', "unknown role 'robot'"),
    ("shape.jsonl", b'{"prompt": "x"}\n', "is not a conversation"),
])
def test_bad_calibration_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=message) as e:
        load_samples(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_calibration_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_calibration(tmp_path / "nope.jsonl")


# ----- the command -----------------------------------------------------------------------------------
def _eval_cli(*args):
    from edgekit.cli import cli

    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_eval_command_prints_the_figures(fp32_bundle, tiny_qwen2_dir, work_dir):
    r = _eval_cli(fp32_bundle, "--reference", tiny_qwen2_dir, "--max-tokens", "48", "--work-dir", work_dir, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tokens"] == 48 and data["top1_agreement"] == 1.0 and data["bundle"] == str(fp32_bundle)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("vocabulary", "has a vocabulary of 300 tokens"),
    ("text", "text file"),  # named as the text file, refused before any export
    ("reference", "no such model"),
])
def test_eval_command_errors_are_one_line(case, message, tiny_bundle, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = {"missing": (tmp_path / "no-bundle", "--reference", tiny_qwen2_dir),
            "vocabulary": (tiny_bundle, "--reference", tiny_llama_dir),
            "text": (tiny_bundle, "--reference", tiny_qwen2_dir, "--text", empty),
            "reference": (tiny_bundle, "--reference", "not-a-model")}[case]
    r = _eval_cli(*args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
