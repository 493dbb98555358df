"""The real model: SmolLM2-135M-Instruct from its packaged GGUF, end to end through the CLI and the runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from refs import hf_gguf_model

pytestmark = pytest.mark.slow          # every test here builds or runs the real model

PROMPT = "Explain in a few sentences why the sky is blue."
EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


@pytest.fixture(scope="module")
def model(smollm2_bundle):
    from edgekit.runtime.model import load

    return load(smollm2_bundle)


@pytest.fixture(scope="module")
def reference_greedy(model, smollm2_gguf) -> list[int]:
    """transformers' greedy reply (fp32 model of the same GGUF) to the chat-templated PROMPT, up to its EOS."""
    import torch

    ids = model.codec.encode(model.codec.render(model.chat_prompt(PROMPT)), add_special_tokens=False)
    with torch.no_grad():
        out = hf_gguf_model(smollm2_gguf).generate(torch.tensor([ids]), max_new_tokens=120, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_32_tokens_identical_to_transformers(model, reference_greedy):
    result = model.generate(messages=model.chat_prompt(PROMPT), max_new_tokens=32, temperature=0)
    assert result.tokens == reference_greedy[:32]
    assert result.text.startswith("The sky is blue because of a process called Rayleigh scattering")


def test_greedy_to_eos_matches_transformers(model, reference_greedy):
    """Greedy until EOS: the reference decides where it stops."""
    assert reference_greedy[-1] in model.eos_ids, "the reference did not stop within 120 tokens"
    result = model.generate(messages=model.chat_prompt(PROMPT), max_new_tokens=120, temperature=0)
    assert result.finish_reason == "stop" and result.tokens == reference_greedy[:-1]


def test_run_json_through_the_console_script(smollm2_bundle):
    out = subprocess.run([*EDGEKIT, "run", str(smollm2_bundle), PROMPT, "--temperature", "0", "-n", "16", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("text", "reasoning", "answer", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_ms",
                "decode_tok_s"):
        assert key in d
    assert d["answer"] == d["text"] and d["reasoning"] == ""
    assert d["completion_tokens"] == 16 and d["finish_reason"] == "length" and d["decode_tok_s"] > 0


def test_bench_json(smollm2_bundle):
    out = subprocess.run([*EDGEKIT, "bench", str(smollm2_bundle), "--prompt-tokens", "8,40", "--new-tokens", "8",
                          "--runs", "2", "--ignore-eos", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cases = json.loads(out.stdout)["cases"]
    assert [c["prompt_tokens"] for c in cases] == [8, 40]
    for c in cases:
        assert c["new_tokens"] == 8 and c["generated"] == 8
        assert c["ttft_ms"] > 0 and c["decode_tok_s"] > 0 and c["peak_rss_mib"] > 100


def test_bench_shared_prefix_json(smollm2_bundle):
    out = subprocess.run([*EDGEKIT, "bench", str(smollm2_bundle), "--shared-prefix", "300", "--new-tokens", "4",
                          "--runs", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    case = json.loads(out.stdout)["shared_prefix"]
    assert case["prefix_tokens"] == 300 and case["runs"] == 1
    # the second prompt keeps the shared prefix (and the shared start of the question) and prefills the rest
    assert 300 <= case["cached_tokens"] < case["second_prompt_tokens"]
    assert case["first_ttft_ms"] > 0 and case["second_ttft_ms"] > 0
    assert case["ratio"] == pytest.approx(case["second_ttft_ms"] / case["first_ttft_ms"], abs=1e-3)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_in_a_real_terminal(smollm2_bundle, tmp_path):
    """`edgekit chat` in tmux: a streamed reply, /reset, and a second turn."""
    session = f"edgekit-test-{os.getpid()}"
    cmd = " ".join([*EDGEKIT, "chat", str(smollm2_bundle), "--temperature", "0", "-n", "24"])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", cmd], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text: str, count: int = 1, timeout: float = 120) -> str:
        end = time.time() + timeout
        while time.time() < end:
            s = screen()
            if s.count(text) >= count:
                return s
            time.sleep(0.3)
        raise AssertionError(f"{text!r} did not appear:\n{screen()}")

    try:
        wait_for(">>>")
        subprocess.run(["tmux", "send-keys", "-t", session, PROMPT, "Enter"], check=True)
        s = wait_for(">>>", 2)                          # the reply streamed, then the next prompt
        assert "The sky is blue because of a process called Rayleigh scattering" in s
        subprocess.run(["tmux", "send-keys", "-t", session, "/reset", "Enter"], check=True)
        wait_for("(conversation cleared)")
        wait_for(">>>", 3)
        subprocess.run(["tmux", "send-keys", "-t", session, "What is 2 plus 2?", "Enter"], check=True)
        wait_for(">>>", 4)
        subprocess.run(["tmux", "send-keys", "-t", session, "/exit", "Enter"], check=True)
        end = time.time() + 30
        while time.time() < end and subprocess.run(["tmux", "has-session", "-t", session],
                                                   capture_output=True).returncode == 0:
            time.sleep(0.3)
        assert subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
