"""ModelSpec: read from the published R1-Distill configs, counted exactly, and refusing malformed configs.

Parameter counts are checked against transformers itself: the model is built on the meta device (no memory,
no weights) and its parameters summed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.errors import ModelFormatError, UnsupportedArchitecture
from edgekit.spec import ModelSpec, RopeScaling, spec_from_config, spec_from_config_file

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
R1_MODELS = sorted(p.name for p in CONFIGS.iterdir() if (p / "config.json").is_file())


def fixture_spec(name: str) -> ModelSpec:
    return spec_from_config_file(CONFIGS / name / "config.json")


def fixture_config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def meta_parameter_count(config: dict) -> int:
    """sum(numel) of the transformers model built from ``config`` on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(config["model_type"],
                                            **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


QWEN_TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
LLAMA_TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


# ----- the R1-Distill fixtures --------------------------------------------------------------------
def test_all_six_fixtures_present():
    assert R1_MODELS == sorted(f"DeepSeek-R1-Distill-{m}" for m in
                               ("Qwen-1.5B", "Qwen-7B", "Qwen-14B", "Qwen-32B", "Llama-8B", "Llama-70B"))


@pytest.mark.parametrize("name, expected", [
    ("DeepSeek-R1-Distill-Qwen-1.5B", 1_777_088_000),
    ("DeepSeek-R1-Distill-Llama-8B", 8_030_261_248),
])
def test_published_parameter_counts(name, expected):
    assert fixture_spec(name).parameters == expected


@pytest.mark.parametrize("name", R1_MODELS)
def test_parameter_count_matches_transformers(name):
    assert fixture_spec(name).parameters == meta_parameter_count(fixture_config(name))


@pytest.mark.parametrize("name, shape", [
    # hidden, intermediate, layers, heads, kv heads, vocab, rope theta
    ("DeepSeek-R1-Distill-Qwen-1.5B", (1536, 8960, 28, 12, 2, 151936, 10000.0)),
    ("DeepSeek-R1-Distill-Qwen-7B", (3584, 18944, 28, 28, 4, 152064, 10000.0)),
    ("DeepSeek-R1-Distill-Qwen-14B", (5120, 13824, 48, 40, 8, 152064, 1e6)),
    ("DeepSeek-R1-Distill-Qwen-32B", (5120, 27648, 64, 40, 8, 152064, 1e6)),
    ("DeepSeek-R1-Distill-Llama-8B", (4096, 14336, 32, 32, 8, 128256, 500000.0)),
    ("DeepSeek-R1-Distill-Llama-70B", (8192, 28672, 80, 64, 8, 128256, 500000.0)),
])
def test_fixture_shapes(name, shape):
    s = fixture_spec(name)
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_kv_heads, s.vocab_size,
            s.rope_theta) == shape
    assert s.head_dim == 128 and s.max_position_embeddings == 131072
    assert not s.tie_word_embeddings and s.source_dtype == "bf16"
    assert s.name == name
    if "Llama" in name:
        assert s.family == "llama" and not s.qkv_bias
        assert s.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
        assert (s.bos_token_id, s.eos_token_ids) == (128000, (128001,))
    else:
        assert s.family == "qwen2" and s.qkv_bias and s.rope_scaling is None
        assert s.eos_token_ids == (151643,)


def test_kv_bytes_per_token_exact():
    # 2 (K and V) x layers x kv_heads x head_dim x bytes
    assert fixture_spec("DeepSeek-R1-Distill-Qwen-1.5B").kv_bytes_per_token("fp16") == 2 * 28 * 2 * 128 * 2 == 28672
    assert fixture_spec("DeepSeek-R1-Distill-Llama-8B").kv_bytes_per_token("fp16") == 131072
    assert fixture_spec("DeepSeek-R1-Distill-Llama-70B").kv_bytes_per_token("fp32") == 2 * 80 * 8 * 128 * 4


# ----- rope settings from both places ----------------------------------------------------------------
def test_rope_theta_from_rope_parameters():
    """transformers 5 writes rope_theta inside rope_parameters; reading only the top level would give 10000."""
    c = dict(QWEN_TINY)
    del c["rope_theta"]
    c["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    s = spec_from_config(c)
    assert s.rope_theta == 100000.0 and s.rope_scaling is None


def test_rope_theta_top_level():
    assert spec_from_config(dict(QWEN_TINY, rope_theta=123456.0)).rope_theta == 123456.0


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_llama3_scaling_from_either_place(where):
    c = dict(LLAMA_TINY)
    if where == "rope_scaling":
        c.update(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    else:
        c["rope_parameters"] = dict(LLAMA3_SCALING, rope_theta=500000.0)
    s = spec_from_config(c)
    assert s.rope_theta == 500000.0
    assert s.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_rope_scaling_old_type_key():
    scaling = {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"} | {"type": "llama3"}
    s = spec_from_config(dict(LLAMA_TINY, rope_scaling=scaling))
    assert s.rope_scaling is not None and s.rope_scaling.factor == 8.0


def test_default_rope_theta_when_absent():
    c = {k: v for k, v in QWEN_TINY.items() if k != "rope_theta"}
    assert spec_from_config(c).rope_theta == 10000.0


# ----- head_dim, biases, tying, eos -----------------------------------------------------------------
def test_head_dim_override_counts_like_transformers():
    c = dict(LLAMA_TINY, head_dim=32)      # hidden 64 / 4 heads would be 16
    s = spec_from_config(c)
    assert s.head_dim == 32 and s.q_size == 128 and s.kv_size == 64
    assert s.linear_shapes["q"] == (128, 64) and s.linear_shapes["o"] == (64, 128)
    assert s.parameters == meta_parameter_count(c)


@pytest.mark.parametrize("config", [
    QWEN_TINY,
    dict(QWEN_TINY, tie_word_embeddings=True),
    LLAMA_TINY,
    dict(LLAMA_TINY, tie_word_embeddings=False, attention_bias=True),   # llama with q/k/v/o biases
    dict(LLAMA_TINY, num_key_value_heads=4),
], ids=["qwen2", "qwen2-tied", "llama-tied", "llama-bias", "llama-mha"])
def test_tiny_parameter_counts_match_transformers(config):
    assert spec_from_config(config).parameters == meta_parameter_count(config)


def test_llama_attention_bias_flags():
    s = spec_from_config(dict(LLAMA_TINY, attention_bias=True))
    assert s.qkv_bias and s.o_bias
    assert not spec_from_config(LLAMA_TINY).o_bias


@pytest.mark.parametrize("eos, expected", [([2, 7, 9], (2, 7, 9)), (5, (5,)), (None, ())])
def test_eos_token_ids(eos, expected):
    c = dict(QWEN_TINY, eos_token_id=eos)
    assert spec_from_config(c).eos_token_ids == expected


# ----- (de)serialisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", R1_MODELS)
def test_to_dict_from_dict_round_trip_through_json(name):
    s = fixture_spec(name)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["parameters"] == s.parameters
    back = ModelSpec.from_dict(d)
    assert back == s and back.parameters == s.parameters and back.rope_scaling == s.rope_scaling


def test_round_trip_tied_with_eos_list():
    s = spec_from_config(dict(LLAMA_TINY, eos_token_id=[2, 3], rope_scaling=LLAMA3_SCALING), name="tiny")
    assert ModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# ----- malformed configs -----------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.pop("architectures"), "no 'architectures' list"),
    (lambda c: c.update(architectures="Qwen2ForCausalLM"), "no 'architectures' list"),
    (lambda c: c.update(architectures=[]), "no 'architectures' list"),
    (lambda c: c.pop("hidden_size"), "missing or has a malformed field"),
    (lambda c: c.pop("num_hidden_layers"), "missing or has a malformed field"),
    (lambda c: c.update(vocab_size="many"), "malformed field"),
    (lambda c: c.update(hidden_size=65), "not a multiple of num_attention_heads"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(intermediate_size=0), "sizes must be positive"),
    (lambda c: c.update(head_dim=15), "odd"),
    (lambda c: c.update(rope_theta=-1.0), "rope_theta must be positive"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope scaling 'yarn'"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "malformed field"),
])
def test_malformed_config(mutate, match):
    c = json.loads(json.dumps(QWEN_TINY))
    mutate(c)
    with pytest.raises(ModelFormatError) as e:
        spec_from_config(c, name="tiny")
    assert match in _one_line(e)


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture) as e:
        spec_from_config(dict(QWEN_TINY, architectures=["MistralForCausalLM"]))
    text = _one_line(e)
    assert "MistralForCausalLM" in text and "LlamaForCausalLM" in text and "Qwen2ForCausalLM" in text


@pytest.mark.parametrize("content, match", [
    ("{ not json", "is not valid JSON (line 1"),
    ("[1, 2]", "is not a JSON object"),
    (b"\xff\xfe\x00", "cannot read"),
])
def test_malformed_config_file(tmp_path, content, match):
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ModelFormatError) as e:
        spec_from_config_file(path)
    assert match in _one_line(e)
