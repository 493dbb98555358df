"""Calibration text: the built-in set and the user's own files, as token sequences for a model.

The built-in set (``edgekit/data/calibration.jsonl``) was written for edgekit: smart-home and robotics
requests, explanations, math word problems, code, several languages, and R1-style answers whose reasoning
sits between ``<think>`` and ``</think>``. Each line is one conversation, ``{"messages": [{"role", "content"}]}``.

A user's ``--calibration FILE`` is either JSON lines in that form (a bare list of messages per line, or
``{"text": "..."}``, is accepted too) or plain UTF-8 text, split into samples at blank lines.

Used by the quantizer (activation statistics) and by ``edgekit eval`` (prompts for the reference to answer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserInputError

BUILTIN = Path(__file__).parent.parent / "data" / "calibration.jsonl"
_ROLES = ("system", "user", "assistant", "tool")

# A sample is a conversation (list of messages) or, from a plain-text file, a string.
Sample = list | str


def load_calibration(path: str | Path | None = None) -> list[list[dict[str, str]]]:
    """The conversations of ``path`` (default: the built-in set). A plain-text paragraph becomes one
    user message. Raises UserInputError naming the file when it is missing, empty, not UTF-8 or malformed."""
    return [s if isinstance(s, list) else [{"role": "user", "content": s}] for s in load_samples(path)]


def load_samples(path: str | Path | None = None, *, what: str = "calibration file") -> list[Sample]:
    """Conversations (from JSON lines) or text paragraphs (from a plain-text file), as written in the file.

    ``what`` names the file in error messages ("calibration file", "text file")."""
    path = Path(path) if path is not None else BUILTIN
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{what} {path} does not exist: give a .jsonl of chat messages or a "
                             "plain-text file") from None
    except IsADirectoryError:
        raise UserInputError(f"{what} {path} is a folder: give a .jsonl of chat messages or a "
                             "plain-text file") from None
    except OSError as e:
        raise UserInputError(f"cannot read {what} {path}: {e.strerror}") from None
    if b"\x00" in raw:
        raise UserInputError(f"{what} {path} is not text (it contains NUL bytes): give a .jsonl of chat "
                             "messages or a UTF-8 plain-text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserInputError(f"{what} {path} is not UTF-8 text (bad byte at offset {e.start}): "
                             "save it as UTF-8, as a .jsonl of chat messages or plain text") from None
    if not text.strip():
        raise UserInputError(f"{what} {path} is empty: give at least one paragraph of text or one "
                             "line of chat messages")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _parse_jsonl(text, path, what)
    return [p.strip() for p in _paragraphs(text)]


def _paragraphs(text: str) -> list[str]:
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def _parse_jsonl(text: str, path: Path, what: str) -> list[Sample]:
    samples: list[Sample] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{what} {path} line {n} is not JSON ({e.msg}): write one "
                                 '{"messages": [{"role": ..., "content": ...}]} object per line') from None
        samples.append(_sample(item, f"{what} {path} line {n}"))
    return samples


def _sample(item: Any, where: str) -> Sample:
    if isinstance(item, dict) and isinstance(item.get("text"), str) and "messages" not in item:
        if not item["text"].strip():
            raise UserInputError(f"{where} has an empty text: remove the line or fill it")
        return item["text"]
    messages = item.get("messages") if isinstance(item, dict) else item
    if not isinstance(messages, list) or not messages:
        raise UserInputError(f'{where} is not a conversation: write {{"messages": [{{"role": "user", "content": '
                             '"..."}]}, a list of messages, or {"text": "..."}')
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserInputError(f"{where}: every message needs a string 'role' and 'content', got {str(m)[:60]!r}")
        if m["role"] not in _ROLES:
            raise UserInputError(f"{where}: unknown role {m['role']!r}, use one of {', '.join(_ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ----- rendering ---------------------------------------------------------------------------------
def render_sample(codec, sample: Sample) -> tuple[str, bool]:
    """(text, whether it is a rendered chat template) for one sample, as the model would see it.

    A conversation ending with an assistant turn is rendered as the prompt up to that turn (with the
    generation prompt) followed by the turn's text verbatim: chat templates of R1 models strip the thought
    from assistant messages in history, and the calibration needs the reasoning text exactly where the model
    produces it. When the generation prompt already opens ``<think>``, the turn's own opening tag is dropped.
    Without a chat template, conversations become "role: content" lines.
    """
    if isinstance(sample, str):
        return sample, False
    if not codec.has_chat_template:
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in sample), False
    if sample[-1]["role"] != "assistant" or len(sample) == 1:
        return codec.render(sample, add_generation_prompt=sample[-1]["role"] != "assistant"), True
    prompt = codec.render(sample[:-1], add_generation_prompt=True)
    answer = sample[-1]["content"]
    if prompt.rstrip().endswith("<think>") and answer.lstrip().startswith("<think>"):
        answer = answer.lstrip()[len("<think>"):].lstrip("\n")
    eos = codec.eos_token or ""
    return prompt + answer + eos, True


def prompt_of(sample: Sample) -> Sample:
    """The sample without its final assistant turn (what a model is asked to answer)."""
    if isinstance(sample, list) and len(sample) > 1 and sample[-1]["role"] == "assistant":
        return sample[:-1]
    return sample


def encode_sample(codec, sample: Sample) -> list[int]:
    text, templated = render_sample(codec, sample)
    return codec.encode(text, add_special_tokens=not templated)


def encode_prompt(codec, sample: Sample) -> list[int]:
    """Token ids of the sample's prompt, ready for the model to continue (generation prompt included)."""
    sample = prompt_of(sample)
    if isinstance(sample, list) and codec.has_chat_template:
        return codec.encode(codec.render(sample, add_generation_prompt=True), add_special_tokens=False)
    text, templated = render_sample(codec, sample)
    return codec.encode(text, add_special_tokens=not templated)


def calibration_token_batches(codec, path: str | Path | None = None, max_tokens: int | None = 512,
                              total_tokens: int | None = None, *, what: str = "calibration file") -> list[list[int]]:
    """One token sequence per calibration sample, rendered with ``codec``'s chat template (raw text without one).

    ``codec`` is a :class:`edgekit.runtime.text.TextCodec` (:func:`codec_from_reader` makes one for a
    checkpoint). Each sequence is cut to ``max_tokens``; ``total_tokens`` stops once that many are collected
    (the last sequence is cut to fit). Sequences keep the file's order.
    """
    if max_tokens is not None and max_tokens < 2:
        raise UserInputError(f"max_tokens must be at least 2, got {max_tokens}")
    batches: list[list[int]] = []
    collected = 0
    for sample in load_samples(path, what=what):
        ids = encode_sample(codec, sample)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if total_tokens is not None:
            ids = ids[:total_tokens - collected]
        if len(ids) >= 2:
            batches.append(ids)
            collected += len(ids)
        if total_tokens is not None and collected >= total_tokens:
            break
    return batches


def codec_from_reader(reader):
    """A TextCodec (tokenizer, chat template, special tokens) for a checkpoint's WeightReader."""
    from ..runtime.text import TextCodec

    special = dict(reader.special_tokens())
    return TextCodec(reader.tokenizer_json(), reader.chat_template(), special)
