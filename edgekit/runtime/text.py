"""Tokenizer and chat template: text in, token ids out, and back — incrementally for streaming.

The chat template is rendered the way transformers renders it (a sandboxed jinja2 environment with
``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``tojson``), so a bundle produces the same prompt
tokens as the reference. A rendered template already holds its BOS token, so it is encoded without adding
special tokens; a plain prompt gets BOS when the tokenizer asks for it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..errors import GenerationError


def _raise(message: str):
    raise GenerationError(f"the chat template refused the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TextCodec:
    def __init__(self, tokenizer_json: str, chat_template: str | None, special: dict[str, Any]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.special = special
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.add_bos = bool(special.get("add_bos_token", False))
        self.bos_id = special.get("bos_token_id")
        self.eos_ids = set(special.get("eos_token_ids") or [])
        self._template = None
        if chat_template:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(chat_template)
            except TemplateError as e:
                raise GenerationError(f"the bundle's chat template does not parse ({e}): rebuild the bundle") from None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra) -> str:
        if self._template is None:
            raise GenerationError("this bundle has no chat template: pass a plain prompt instead of messages")
        _check_messages(messages)
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except TemplateError as e:
            raise GenerationError(f"the chat template failed on these messages ({e})") from None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [int(self.bos_id), *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = True) -> "DeltaDecoder":
        return DeltaDecoder(self.tokenizer, skip_special_tokens)


class DeltaDecoder:
    """Token ids in, text deltas out; never splits a UTF-8 character (a partial one waits for the next token)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self._stream.step(self.tokenizer, int(token_id)) or ""


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise GenerationError("each message must be an object with string 'role' and 'content', "
                                  f"got {str(m)[:80]!r}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise GenerationError(f"unknown message role {m['role']!r}: use system, user, assistant or tool")
