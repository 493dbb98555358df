"""Tiny random-weight Qwen2 and Llama checkpoints, written by transformers, for numerics tests."""

from __future__ import annotations

from pathlib import Path

QWEN2 = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=320, hidden_size=64,
    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
# Llama with Llama-3 rope scaling, GQA (4 heads over 2 KV heads) and a tied LM head.
LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
    bos_token_id=1, eos_token_id=2,
)


def make_model(kind: str, folder: Path, seed: int = 0, **overrides):
    """Save a random model of ``kind`` ("qwen2"|"llama") to ``folder``; returns the torch model (eval, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(QWEN2 if kind == "qwen2" else LLAMA)
    base.update(overrides)
    model_type = base.pop("model_type")
    config = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny (std 0.02); widen it so the numerics are not trivially flat
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            else:   # norm weights (init 1) and biases (init 0): a dropped one must change the outputs
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model


# An R1-style template: the generation prompt opens a thought, as DeepSeek-R1-Distill's does.
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<think>", "</think>"]


def make_tokenizer(folder: Path, template: str | None = R1_TEMPLATE) -> None:
    """A byte-level tokenizer (256 byte tokens, no merges) with the specials above at ids 256...

    ``<think>``/``</think>`` are ordinary added tokens (not special) as in the R1 tokenizers, so they
    survive decoding with skip_special_tokens.
    """
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS[:4]])
    tok.add_tokens([AddedToken(t, special=False) for t in SPECIALS[4:]])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": 257}))


def make_tiny(kind: str, folder: Path, seed: int = 0, template: str | None = R1_TEMPLATE, **overrides):
    """A complete tiny model folder (weights, config, tokenizer, template) whose ids match the tokenizer."""
    model = make_model(kind, folder, seed=seed, bos_token_id=256, eos_token_id=257, **overrides)
    make_tokenizer(folder, template)
    return model
