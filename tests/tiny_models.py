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
            elif "norm" not in "":
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model
