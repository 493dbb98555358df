"""Check, before any build work, that the runtime can render a model's chat template.

A bundle's template is rendered on the device by :class:`edgekit.runtime.text.TextCodec` (sandboxed jinja2
with the helpers transformers provides). A template that uses something else — a tag of another jinja
extension (transformers' ``{% generation %}``), a filter or test jinja2 does not have, a function nobody
defines — would fail only there, at the first chat, after a long build. Here the template is compiled by
that same class and rendered on a few typical conversations; a failure is a one-line ModelFormatError
naming the feature.
"""

from __future__ import annotations

import re

from ..errors import GenerationError, ModelFormatError

# The smallest tokenizer TextCodec accepts: only the template matters here.
_NO_TOKENIZER = ('{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null, '
                 '"post_processor": null, "decoder": null, '
                 '"model": {"type": "WordLevel", "vocab": {"x": 0}, "unk_token": "x"}}')
# Conversations every chat model meets: the first must render; the others may be refused by the
# template's own raise_exception (some templates allow no system turn), but not fail otherwise.
_CONVERSATIONS = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nok\n</think>\n\nHello."}, {"role": "user", "content": "Why?"}],
)
_FIX = "build from the model's Hugging Face folder, or re-convert the GGUF with a template the runtime renders"


def check_template(template: str, file: str) -> None:
    """Raise ModelFormatError when the runtime cannot render ``template``."""
    from ..runtime.text import TextCodec

    try:
        # Stand-in BOS/EOS strings: what they are does not change whether the template renders.
        codec = TextCodec(_NO_TOKENIZER, template, {"bos_token": "<s>", "eos_token": "</s>"})
    except GenerationError as e:
        raise ModelFormatError(f"{file}'s chat template {_feature(str(e), 'does not compile')}: edgekit's "
                               f"runtime cannot render it; {_FIX}") from None
    for i, messages in enumerate(_CONVERSATIONS):
        for prompt in (True, False):
            try:
                codec.render(messages, add_generation_prompt=prompt)
            except GenerationError as e:
                if i and str(e).startswith("the chat template refused the messages"):
                    continue
                raise ModelFormatError(
                    f"{file}'s chat template fails on a {' '.join(m['role'] for m in messages)} conversation "
                    f"({_feature(str(e), 'error')}): edgekit's runtime cannot render it; {_FIX}") from None


def _feature(message: str, kind: str) -> str:
    """Jinja's own words, turned into what the template uses."""
    inner = message.split("(", 1)[1].rsplit(")", 1)[0] if "(" in message else message
    if m := re.search(r"unknown tag '(\w+)'", inner):
        return f"uses the tag {{% {m.group(1)} %}}"
    if m := re.search(r"No (filter|test) named '(\w+)'", inner):
        return f"uses the {m.group(1)} '{m.group(2)}'"
    if m := re.search(r"'(\w+)' is undefined", inner):
        return f"uses '{m.group(1)}', which is not defined"
    return f"{kind}: {' '.join(inner.split())[:200].rstrip('. ')}"
