"""benchmarks/compare_peers.py: its fidelity reference is transformers' fp32 model, and its targets compare
edgekit only with peers of the same precision (llama.cpp's same-format Q4_1 row included)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import peers_report


def _row(label, peer, precision, decode, ttft=50.0, rss=200.0, top1=None, kl=None):
    row = {"label": label, "peer": peer, "precision": precision,
           "speed": {"decode_tok_s": decode, "ttft_ms": ttft, "peak_rss_mib": rss, "ttft_ms_spread": 0,
                     "decode_tok_s_spread": 0, "other_cores": 0.0}}
    if top1 is not None:
        row["fidelity"] = {"top1_agreement": top1, "mean_kl": kl}
    return row


def test_targets_are_not_marked_against_another_precision():
    rows = [_row("edgekit fp32", "edgekit", "fp32", 40.0, top1=1.0, kl=0.0),
            _row("llama.cpp Q4_0", "llama.cpp", "int4", 150.0, top1=0.77, kl=0.28),
            _row("onnxruntime-genai int4", "onnxruntime-genai", "int4", 170.0, top1=0.75, kl=0.34)]
    out = peers_report.targets(rows, rss_budget=1000)
    assert [t["target"] for t in out] == ["decode, TTFT and fidelity against the peers",
                                          "peak RSS <= bundle weights + KV + 100 MiB"]
    assert out[0]["met"] is None and out[0]["detail"] == ("not compared: edgekit runs fp32, the target rows run "
                                                          "int4 (use --precision int4)")
    res = {"model": "m", "key": "m", "prompt_tokens": 41, "new_tokens": 128, "context": 1024, "runs": 1,
           "rows": rows, "skipped": {}, "fidelity_note": None, "builds": {}, "targets": out}
    assert "  target decode, TTFT and fidelity against the peers: NOT COMPARED (not compared: edgekit runs fp32" \
        in peers_report.table(res, 2)


def test_the_same_format_llama_cpp_row_is_a_target():
    rows = [_row("edgekit int4", "edgekit", "int4", 110.0, top1=0.97, kl=0.003),
            _row("llama.cpp Q4_0", "llama.cpp", "int4", 140.0, top1=0.77, kl=0.28),
            _row("llama.cpp Q4_1 (GGUF as is)", "llama.cpp", "int4", 150.0, ttft=40.0, top1=0.98, kl=0.002)]
    out = {t["target"]: t for t in peers_report.targets(rows, rss_budget=1000)}
    assert out["decode >= 1.0x the faster peer (llama.cpp Q4_1 (GGUF as is))"]["met"] is False
    assert out["TTFT <= the faster peer's (llama.cpp Q4_1 (GGUF as is))"]["met"] is False
    assert out["fidelity: higher top-1 and lower KL than each peer"]["met"] is False     # Q4_1 is more faithful


def test_readme_lists_the_same_format_row():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "| | llama.cpp Q4_1 (GGUF as is" in readme


@pytest.mark.slow
def test_fidelity_reference_is_transformers_fp32(smollm2_gguf, tmp_path):
    """The stored reference logits are transformers' own (its fp32 model of the GGUF), not an edgekit export."""
    import compare_peers
    import torch
    from refs import hf_gguf_model

    done = compare_peers.worker_reference({"model": str(smollm2_gguf), "out": str(tmp_path), "context": 256,
                                           "max_tokens": 8, "threads": 2})
    assert done["tokens"] >= 8
    text = json.loads((tmp_path / "tokens.json").read_text())
    ids, start = text["sequences"][0], text["starts"][0]
    with torch.no_grad():
        expected = hf_gguf_model(smollm2_gguf)(torch.tensor([ids])).logits[0].numpy()[start:-1]
        greedy = hf_gguf_model(smollm2_gguf).generate(torch.tensor([ids[:start + 1]]), do_sample=False,
                                                      max_new_tokens=len(ids) - start - 1)
    assert greedy[0].tolist() == ids                                   # the text is the reference's own
    np.testing.assert_allclose(np.load(tmp_path / "reference-0.npy"), expected, rtol=0, atol=1e-4)
