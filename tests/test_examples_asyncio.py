"""examples/asyncio_chat.py, run as a user runs it, against the runtime's own answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgekit.runtime.model import load

EXAMPLE = Path(__file__).parents[1] / "examples" / "asyncio_chat.py"


def _run(*args):
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_a_conversation_streams_the_same_answers_as_generate(smollm2_bundle):
    questions = ["What is 2+2?", "Why is the sky blue?"]
    out = _run(smollm2_bundle, *questions, "--max-tokens", 24, "--temperature", 0)
    assert out.returncode == 0, out.stderr
    model = load(smollm2_bundle)
    history, results = [], []
    for q in questions:   # the second question is asked with the first answer in the history
        history.append({"role": "user", "content": q})
        results.append(model.generate(messages=history, max_new_tokens=24, temperature=0))
        history.append({"role": "assistant", "content": results[-1].answer})
    lines = out.stdout.splitlines()
    assert lines[0::3] == [f"> {q}" for q in questions]
    assert lines[1::3] == [r.answer for r in results] and all("\n" not in r.answer for r in results)
    assert len(lines) == 6 and all(line.startswith(f"[{r.completion_tokens} tokens (0 reasoning), ")
                                   and line.endswith(f", {r.finish_reason}]") for line, r in zip(lines[2::3], results))


def test_timeout_cancels_the_answer_and_the_chat_goes_on(smollm2_bundle):
    out = _run(smollm2_bundle, "Tell me a long story.", "--max-tokens", 600, "--timeout", 0.5)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[no answer within 0.5 s: cancelled]"


def test_a_missing_bundle_is_one_line(tmp_path):
    out = _run(tmp_path / "nope", "hello")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"asyncio_chat: bundle {tmp_path / 'nope'} does not exist: give the folder that " \
                         "edgekit build wrote (-o)\n"
