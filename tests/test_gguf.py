"""GGUF reading: spec, weights, raw blocks, tokenizer, chat template, errors.

References: transformers loading the same GGUF (config, state dict, tokenizer), for the real SmolLM2 file
(llama: q/k permutation, Q4_1/Q8_0/F32) and for tiny files written here with gguf.GGUFWriter (qwen2 with
biases, Q8_0/F16; llama).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from refs import Vocab, hf_gguf_model, hf_gguf_tokenizer, llamacpp_permute, write_tiny_gguf, write_tokenizer_gguf

from edgekit.architectures import GGUF_WEIGHT_NAMES, HF_WEIGHT_NAMES, layer_name
from edgekit.errors import ModelFormatError, UnsupportedArchitecture, UnsupportedQuantType
from edgekit.sources import open_weights, resolve
from edgekit.sources.gguf import SUPPORTED_QUANT_TYPES, GGUFReader, spec_from_gguf, unpermute_qk
from edgekit.sources.gguf_tokenizer import PRE_TOKENIZERS, tokenizer_json
from edgekit.spec import spec_from_config

TEXTS = [
    "Hello world!", "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "12345 and 3.14159, 1,000,000 or 2024-11-29", "   spaces   and\ttabs\t\t", "\n\n\nnewlines\r\nand\n  indents",
    "emoji 😀👍🏽 family 👨‍👩‍👧", "中文字符 日本語のテキスト 한국어", "café naïve résumé Ørsted Ünïcödé",
    "don't I'll we've HE'S 'tis", "", " ", "a  b   c    d", "trailing spaces   ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x<|im_end|>y<repo_name>",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with GGUFReader(smollm2_gguf) as reader:
        yield reader


def _hf_state(path) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf_gguf_model(path).state_dict().items()}


def _compare_all(reader: GGUFReader, state: dict[str, np.ndarray]) -> tuple[int, float]:
    """(tensors compared, max abs difference) over every canonical weight the file has."""
    compared, worst = 0, 0.0
    for canonical in HF_WEIGHT_NAMES:
        for layer in range(reader.spec.num_layers) if "{i}" in canonical else (None,):
            if not reader.has(canonical, layer):
                continue
            ours, theirs = reader.tensor(canonical, layer), state[layer_name(HF_WEIGHT_NAMES, canonical, layer)]
            assert ours.dtype == np.float32 and ours.shape == theirs.shape, (canonical, layer)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            compared += 1
    return compared, worst


def _canonical(gguf_name: str) -> tuple[str, int | None]:
    """GGUF tensor name -> (canonical template, layer)."""
    parts = gguf_name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" else None
    template = ".".join(["blk", "{i}", *parts[2:]]) if layer is not None else gguf_name
    return next(k for k, v in GGUF_WEIGHT_NAMES.items() if v == template), layer


def _one_line_error(kind, call, *parts):
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


# ----- spec ----------------------------------------------------------------------------------------
def test_spec_matches_transformers_config(smollm2_gguf, smol):
    spec = spec_from_gguf(smollm2_gguf)
    assert spec == smol.spec
    config = hf_gguf_model(smollm2_gguf).config.to_dict()   # the config transformers derived from the file
    config["architectures"] = ["LlamaForCausalLM"]
    reference = spec_from_config(config)
    # Everything but provenance agrees with what transformers derives (rope theta 100000, not 10000).
    assert dataclasses.replace(reference, name=spec.name, source_dtype=spec.source_dtype) == spec
    assert (spec.rope_theta, spec.num_kv_heads, spec.head_dim, spec.tie_word_embeddings) == (100000.0, 3, 64, True)
    # The display name is general.basename + general.size_label, not the prettified general.name
    # ("Smollm2 135M 8k Lc100K Mix1 Ep2").
    assert spec.source_dtype == "q4_1" and spec.name == "smollm2-135M"
    assert spec.parameters == sum(p.numel() for p in hf_gguf_model(smollm2_gguf).parameters())


def test_resolve_and_open_weights(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = resolve(str(tiny.path))
    assert source.kind == "gguf" and source.path == tiny.path and source.spec == spec_from_gguf(tiny.path)
    reader = open_weights(source)
    try:
        assert isinstance(reader, GGUFReader)
        assert np.array_equal(reader.tensor("final_norm.weight"), tiny.weights["output_norm.weight"])
    finally:
        reader.close()


# ----- weights -------------------------------------------------------------------------------------
def test_every_smollm2_tensor_equals_transformers(smollm2_gguf, smol):
    state = _hf_state(smollm2_gguf)
    compared, worst = _compare_all(smol, state)
    # 30 layers x 9 tensors + embedding + final norm (the head is tied); both dequantize with gguf.quants.
    assert compared == 272 == len(state) - 1
    assert worst == 0.0
    assert not smol.has("lm_head.weight") and not smol.has("layers.{i}.q.bias", 0)


def test_raw_blocks_are_the_stored_bytes_in_hf_row_order(smol):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind, blocks, shape = smol.raw("layers.{i}.q.weight", 3)
    assert (kind, shape, blocks.shape, blocks.dtype) == ("Q4_1", (576, 576), (576, 18, 20), np.uint8)
    assert not blocks.flags.writeable
    values = dequantize(np.ascontiguousarray(blocks).reshape(576, -1), GGMLQuantizationType.Q4_1)
    assert np.array_equal(values, smol.tensor("layers.3.q.weight"))  # q is un-permuted in both
    kind, blocks, shape = smol.raw("embed.weight")
    assert (kind, shape, blocks.shape) == ("Q8_0", (49152, 576), (49152, 18, 34))
    kind, blocks, shape = smol.raw("layers.{i}.attn_norm.weight", 0)
    assert (kind, shape, blocks.shape) == ("F32", (576,), (576, 4))   # 1-D: (elements, bytes each)
    assert np.array_equal(blocks.reshape(-1).view(np.float32), smol.tensor("layers.{i}.attn_norm.weight", 0))


def test_unpermute_inverts_llamacpp_permutation():
    rng = np.random.default_rng(1)
    for shape, heads in (((3 * 8, 5), 3), ((4 * 16,), 4), ((2 * 8, 3, 7), 2)):
        values = rng.standard_normal(shape).astype(np.float32)
        permuted = llamacpp_permute(values, heads)
        assert not np.array_equal(permuted, values)
        assert np.array_equal(unpermute_qk(permuted, heads), values)


def test_tensors_are_fresh_arrays_and_close_releases_the_file(tmp_path):
    reader = GGUFReader(write_tiny_gguf(tmp_path / "tiny.gguf").path)
    norm = reader.tensor("final_norm.weight")             # an F32 tensor: must not be a view of the file
    norm += 1.0
    assert not np.array_equal(norm, reader.tensor("final_norm.weight"))
    reader.close()
    assert norm.shape == (64,)
    with pytest.raises(ValueError, match="closed"):
        reader.has("embed.weight")


def test_fingerprint_is_the_file_sha256(smollm2_gguf, smol):
    expected = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert smol.fingerprint() == expected == smol.fingerprint()


def test_tiny_qwen2_q8_0_and_f16_equal_transformers(tmp_path):
    from gguf import GGMLQuantizationType

    tiny = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", arch="qwen2", types={"blk.1.attn_v.weight": "F16"})
    with GGUFReader(tiny.path) as reader:
        spec = reader.spec
        assert (spec.architecture, spec.qkv_bias, spec.tie_word_embeddings, spec.num_layers) == (
            "Qwen2ForCausalLM", True, False, 2)
        assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (4, 2, 16, len(tiny.vocab.tokens))
        assert spec.source_dtype == "q8_0" and spec.name == "tiny-qwen2"
        compared, worst = _compare_all(reader, _hf_state(tiny.path))
        assert compared == 3 + 2 * 12 and worst == 0.0
        for name, original in tiny.weights.items():
            canonical, layer = _canonical(name)
            ours = reader.tensor(canonical, layer)
            kind = tiny.types[name]
            assert reader.raw(canonical, layer)[0] == kind
            if kind == "Q8_0":
                # 8-bit blocks of 32: half a step of rounding, plus up to 127 steps times the fp16 scale's
                # relative rounding error (2**-11)
                step = np.abs(original).reshape(-1, 32).max(axis=1) / 127
                bound = step * (0.5 + 127 * 2.0**-11)
                assert np.all(np.abs(ours - original).reshape(-1, 32) <= bound[:, None] + 1e-7), name
            elif kind == "F16":
                assert np.array_equal(ours, original.astype(np.float16).astype(np.float32)), name
            else:
                assert np.array_equal(ours, original), name
    assert GGMLQuantizationType.Q8_0.name in SUPPORTED_QUANT_TYPES


def test_tiny_llama_with_rope_freqs(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny-llama.gguf", arch="llama", rope_freqs=True, tie=True)
    with GGUFReader(tiny.path) as reader:
        factors = tiny.weights["rope_freqs.weight"]
        assert dict(reader.spec.extras)["rope_freqs"] == tuple(float(f) for f in factors)
        assert reader.spec.rope_scaling is None and reader.spec.tie_word_embeddings
        assert np.array_equal(reader.tensor("rope_freqs.weight"), factors)
        # q/k come back in Hugging Face row order (the file stores them permuted).
        q = reader.tensor("layers.{i}.q.weight", 1)
        assert np.abs(q - tiny.weights["blk.1.attn_q.weight"]).max() < 1e-3
        assert np.abs(q - llamacpp_permute(tiny.weights["blk.1.attn_q.weight"], 4)).max() > 1e-2


def test_every_supported_type_dequantizes():
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    for name in SUPPORTED_QUANT_TYPES:
        qtype = GGMLQuantizationType[name]
        block, size = GGML_QUANT_SIZES[qtype]
        # (2 blocks, their bytes); the gguf package hands F32/F16 tensors over as float arrays instead
        data = {"F32": np.zeros((2, 1), np.float32), "F16": np.zeros((2, 1), np.float16)}.get(
            name, np.zeros((2, size), np.uint8))
        values = dequantize(data, qtype)
        assert values.shape == (2, block) and not values.any(), name


# ----- tokenizer -----------------------------------------------------------------------------------
def _assert_same_tokenizer(ours_json: str, hf, texts) -> list[list[int]]:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(ours_json)
    encoded = []
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        # byte-level BPE is lossless
        assert ours.decode(ours.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
        encoded.append(ids)
    return encoded


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, smol):
    hf = hf_gguf_tokenizer(smollm2_gguf)
    chat = hf.apply_chat_template([{"role": "user", "content": "Explain in a few sentences why the sky is blue."}],
                                  tokenize=False, add_generation_prompt=True)
    encoded = _assert_same_tokenizer(smol.tokenizer_json(), hf, [*TEXTS, chat])
    assert encoded[TEXTS.index("12345 and 3.14159, 1,000,000 or 2024-11-29")][:5] == [
        hf.convert_tokens_to_ids(d) for d in "12345"]   # SmolLM2 ("smollm") takes digits one at a time
    assert encoded[-1][0] == 1 and encoded[-1].count(2) == 2  # <|im_start|> ... two <|im_end|>, no BOS added
    assert smol.chat_template() == hf.chat_template
    special = smol.special_tokens()
    assert special["bos_token"] == hf.bos_token == "<|im_start|>"
    assert special["eos_token"] == hf.eos_token == "<|im_end|>"
    assert (special["bos_token_id"], special["eos_token_ids"], special["add_bos_token"]) == (1, [2], False)


def _small_smollm2_vocab(reader: GGUFReader, merges: int) -> Vocab:
    """SmolLM2's specials, its single characters and the tokens made by its first ``merges`` merges."""
    meta = reader._tokenizer_meta()
    tokens, types, rules = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], \
        meta["tokenizer.ggml.merges"][:merges]
    keep = [i for i, t in enumerate(tokens) if types[i] != 1 or len(t) == 1]
    made = {a + b for a, b in (r.split(" ") for r in rules)}
    keep += [i for i, t in enumerate(tokens) if types[i] == 1 and len(t) > 1 and t in made]
    return Vocab([tokens[i] for i in keep], [types[i] for i in keep], rules)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_other_pre_tokenizers_match_transformers(pre, smol, tmp_path):
    """The R1-Distill-Qwen ("qwen2"/"deepseek-r1-qwen") and R1-Distill-Llama ("llama-bpe") splits, with BOS added."""
    vocab = _small_smollm2_vocab(smol, 6000)
    path = write_tokenizer_gguf(tmp_path / f"{pre}.gguf", vocab, pre=pre, add_bos=True, bos=1, eos=2)
    import gguf

    fields = gguf.GGUFReader(path).fields
    meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    hf = hf_gguf_tokenizer(path)
    encoded = _assert_same_tokenizer(tokenizer_json(meta, path.name), hf, TEXTS)
    assert all(ids[:1] == [1] for ids in encoded)
    # The splits really differ from SmolLM2's GPT-2 rules: the same vocabulary tokenizes some text differently.
    meta["tokenizer.ggml.pre"] = "smollm"
    from tokenizers import Tokenizer

    gpt2_style = Tokenizer.from_str(tokenizer_json(meta, path.name))
    assert any(gpt2_style.encode(t).ids != ids for t, ids in zip(TEXTS, encoded))


def test_smollm_splits_digits_like_llama_cpp():
    """llama.cpp's "smollm" rules cut every digit off before the GPT-2 split (SmolLM2's own tokenizer.json does
    the same). SmolLM2's merges never join digits, so transformers' plain GPT-2 split agrees on its vocabulary;
    a vocabulary that has a digit merge shows the difference."""
    from refs import byte_level_vocab
    from tokenizers import Tokenizer

    vocab = byte_level_vocab(words=(" 12",))
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": vocab.tokens,
            "tokenizer.ggml.token_type": vocab.types, "tokenizer.ggml.merges": vocab.merges}
    pieces = {}
    for pre in ("smollm", "gpt2"):
        tk = Tokenizer.from_str(tokenizer_json({**meta, "tokenizer.ggml.pre": pre}))
        pieces[pre] = tk.encode(" 12").tokens
    assert pieces == {"smollm": ["Ġ", "1", "2"], "gpt2": ["Ġ12"]}


def test_pre_tokenizer_aliases():
    assert PRE_TOKENIZERS["deepseek-r1-qwen"] == PRE_TOKENIZERS["qwen2"]
    assert PRE_TOKENIZERS["llama3"] == PRE_TOKENIZERS["llama-bpe"] and PRE_TOKENIZERS["llama-bpe"][1:] == (True, True)


def test_tiny_tokenizer_added_tokens(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    with GGUFReader(tiny.path) as reader:
        hf = hf_gguf_tokenizer(tiny.path)
        texts = [" hello world<think> the 12<|im_end|>", "hello<|im_start|>x", "ünï 😀"]
        encoded = _assert_same_tokenizer(reader.tokenizer_json(), hf, texts)
        think = tiny.vocab.tokens.index("<think>")
        assert think in encoded[0] and encoded[0][-1] == 2
        from tokenizers import Tokenizer

        ours = Tokenizer.from_str(reader.tokenizer_json())
        # user-defined <think> survives skip_special_tokens; control <|im_end|> does not
        assert ours.decode(encoded[0], skip_special_tokens=True) == " hello world<think> the 12"


def test_unsupported_tokenizers_are_one_line_errors():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    assert '"ab": 2' in tokenizer_json(base, "x.gguf")
    _one_line_error(ModelFormatError, lambda: tokenizer_json({**base, "tokenizer.ggml.model": "llama"}, "x.gguf"),
                    "x.gguf", "SentencePiece", "'gpt2'")
    _one_line_error(ModelFormatError, lambda: tokenizer_json({**base, "tokenizer.ggml.pre": "falcon"}, "x.gguf"),
                    "x.gguf", "'falcon'", "qwen2", "llama-bpe", "smollm")
    _one_line_error(ModelFormatError, lambda: tokenizer_json({**base, "tokenizer.ggml.merges": ["ab"]}, "x.gguf"),
                    "x.gguf", "'ab'")
    _one_line_error(ModelFormatError,
                    lambda: tokenizer_json({**base, "tokenizer.ggml.bos_token_id": 7}, "x.gguf"), "bos_token_id")


# ----- errors --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_gguf, smol):
    return smollm2_gguf.read_bytes(), smol.header.data_offset   # where the tensor data region starts


@pytest.mark.parametrize("where", ["empty", "magic", "header", "tokens", "tensor table", "tensor data", "last byte"])
def test_truncated_smollm2_is_a_format_error(where, smollm2_bytes, tmp_path):
    data, data_offset = smollm2_bytes
    n = {"empty": 0, "magic": 3, "header": 100, "tokens": 600_000, "tensor table": data_offset - 200,
         "tensor data": data_offset + 5_000_000, "last byte": len(data) - 1}[where]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:n])
    word = "empty" if n == 0 else "truncated"
    # (GGUFReader and spec_from_gguf open files the same way; one of them per cut keeps this fast)
    call = (lambda: GGUFReader(path)) if n < 1000 else (lambda: spec_from_gguf(path))
    _one_line_error(ModelFormatError, call, "cut.gguf", word, "re-download")


def test_data_region_is_checked_against_the_file_size(tmp_path):
    """A file cut inside its last tensor is refused when opened, naming that tensor, not when it is read."""
    import gguf

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    last = gguf.GGUFReader(tiny.path).tensors[-1]
    end = int(last.data_offset + last.n_bytes)
    with open(tiny.path, "r+b") as f:
        f.truncate(end - 64)
    for call in (lambda: GGUFReader(tiny.path), lambda: spec_from_gguf(tiny.path)):
        _one_line_error(ModelFormatError, call, "tiny.gguf", "truncated", repr(last.name),
                        f"needs bytes up to {end}", f"the file has {end - 64}")


def test_not_a_gguf(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("this is not a model\n")
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(text), "model.gguf", "not a GGUF file")
    st = tmp_path / "weights.gguf"
    st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _one_line_error(ModelFormatError, lambda: GGUFReader(st), "weights.gguf", "not a GGUF file")
    future = write_tiny_gguf(tmp_path / "v9.gguf").path
    data = bytearray(future.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")                  # the version field after the magic
    future.write_bytes(bytes(data))
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(future), "v9.gguf", "GGUF version 9",
                    "versions 2 and 3", "re-convert")


def test_missing_metadata_and_tensors(tmp_path):
    no_layers = write_tiny_gguf(tmp_path / "a.gguf", skip_keys=("qwen2.block_count",)).path
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(no_layers), "a.gguf", "'qwen2.block_count'")
    no_eps = write_tiny_gguf(tmp_path / "b.gguf", skip_keys=("qwen2.attention.layer_norm_rms_epsilon",)).path
    _one_line_error(ModelFormatError, lambda: GGUFReader(no_eps), "b.gguf", "layer_norm_rms_epsilon")
    no_up = write_tiny_gguf(tmp_path / "c.gguf", skip_tensors=("blk.1.ffn_up.weight",)).path
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(no_up), "c.gguf", "'blk.1.ffn_up.weight'")
    yarn = write_tiny_gguf(tmp_path / "d.gguf", extra_meta={"qwen2.rope.scaling.type": "yarn"}).path
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(yarn), "d.gguf", "'yarn'", "llama3")
    partial = write_tiny_gguf(tmp_path / "e.gguf", extra_meta={"qwen2.rope.dimension_count": 8}).path
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(partial), "e.gguf", "rope.dimension_count")
    # Defaults where llama.cpp has them: no head_count_kv means no grouping, no freq_base means 10000.
    plain = write_tiny_gguf(tmp_path / "f.gguf", kv_heads=4,
                            skip_keys=("qwen2.attention.head_count_kv", "qwen2.rope.freq_base")).path
    spec = spec_from_gguf(plain)
    assert (spec.num_kv_heads, spec.rope_theta) == (4, 10000.0)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "phi.gguf", arch="phi3").path
    _one_line_error(UnsupportedArchitecture, lambda: spec_from_gguf(path), "'phi3'", "llama", "qwen2")


def test_unsupported_quant_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "q8k.gguf", types={"blk.1.ffn_down.weight": "Q8_K"}).path
    for call in (lambda: spec_from_gguf(path), lambda: GGUFReader(path)):
        _one_line_error(UnsupportedQuantType, call, "q8k.gguf", "'blk.1.ffn_down.weight'", "Q8_K", "Q4_K", "Q8_0")


def test_unknown_ggml_type_id(tmp_path):
    """A type id the gguf package has never heard of (here 4, the removed Q4_2) is named, not a crash."""
    path = write_tiny_gguf(tmp_path / "old.gguf", types={"blk.0.ffn_gate.weight": "F32"}).path
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_gate.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == 0   # F32
    data[type_at:type_at + 4] = (4).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    _one_line_error(UnsupportedQuantType, lambda: spec_from_gguf(path), "old.gguf", "type id 4", "Q4_K")


# ----- what edgekit cannot reproduce is refused when the file is opened ------------------------------
def test_unknown_tokenizer_is_refused_before_any_work(tmp_path):
    """An unknown pre-tokenizer or tokenizer model stops spec, plan and build at once (a build used to find
    out only after its export), naming what the file has; never a silently different split."""
    from click.testing import CliRunner

    from edgekit.cli import cli

    falcon = write_tiny_gguf(tmp_path / "falcon.gguf", pre="falcon").path
    spm = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama").path
    for path, words in ((falcon, ("pre-tokenizer 'falcon'", "deepseek-r1-qwen", "llama-bpe")),
                        (spm, ("SentencePiece", "'llama'", "'gpt2'"))):
        _one_line_error(ModelFormatError, lambda p=path: spec_from_gguf(p), path.name, *words)
        _one_line_error(ModelFormatError, lambda p=path: GGUFReader(p), path.name, *words)
        for command in (["plan", str(path), "--target", "cpu"],
                        ["build", str(path), "--target", "cpu", "-o", str(tmp_path / "out")]):
            result = CliRunner().invoke(cli, command)
            assert result.exit_code == 2 and words[0] in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template, words", [
    ("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}", ("tag {% generation %}",)),
    ("{{ messages | shuffle_all }}", ("filter 'shuffle_all'",)),
    ("{% if messages is long %}x{% endif %}", ("test 'long'",)),
    ("{{ format_tools(tools) }}{{ messages[0]['content'] }}", ("'format_tools'", "not defined", "user")),
    ("{% for m in messages %}{{ m['content'] }}", ("does not compile",)),
])
def test_templates_the_runtime_cannot_render_are_refused(template, words, tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", chat_template=template).path
    message = _one_line_error(ModelFormatError, lambda: spec_from_gguf(path), "t.gguf", "chat template",
                              "cannot render", *words)
    assert "Hugging Face folder" in message


def test_templates_the_runtime_renders_are_accepted(tmp_path):
    """A template may refuse a conversation itself (here: no system turn, as Gemma's does), use the helpers
    transformers provides, loop controls, and variables it leaves undefined (date_string)."""
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}{% if loop.index > 50 %}{% break %}{% endif %}{{ m['content'] | tojson }}"
        "{% endfor %}{{ strftime_now('%Y') }}{{ date_string | default('') }}{% if tools %}{{ tools }}{% endif %}")
    path = write_tiny_gguf(tmp_path / "ok.gguf", chat_template=template).path
    assert spec_from_gguf(path).num_layers == 2
