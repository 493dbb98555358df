"""The tokenizer a GGUF describes, as a `tokenizers` JSON document (tokenizer.json).

A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary, the merges, each token's
type and the name of the pre-tokenizer (``tokenizer.ggml.pre``) as metadata, and llama.cpp rebuilds the
splitting rules from that name. We do the same, so the bundle's tokenizer cuts text exactly where the
model's merges were learned. Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is converted: that is
what the R1-Distill (Qwen and Llama) and SmolLM2 GGUFs use.

Input is a plain mapping of metadata keys to Python values (``"tokenizer.ggml.tokens" -> [str]``), so this
module does not depend on the gguf package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import ModelFormatError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split rules, written as in the models' own tokenizer.json files. llama.cpp keeps equivalent copies
# (it spells the case-insensitive contractions out as character classes); the tokenizers library takes
# the original form.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 differs from Llama-3 only in taking digits one at a time.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_BYTE_LEVEL_WITH_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split_then_bytes(regex: str) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        _BYTE_LEVEL_ONLY]}


# The GPT-2 rules with every digit cut off first (SmolLM2/StarCoder): llama.cpp runs "\p{N}" before them.
_DIGITS_THEN_GPT2 = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL_WITH_REGEX]}


# tokenizer.ggml.pre -> (pre-tokenizer JSON, ignore_merges, add_bos default when the file does not say).
# llama.cpp's Llama-3 family takes a pre-token that is already in the vocabulary whole, without merging
# (ignore_merges), and adds BOS unless told not to; the others merge everything and add nothing.
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "gpt2": (_BYTE_LEVEL_WITH_REGEX, False, False),
    **{name: (_DIGITS_THEN_GPT2, False, False) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (_split_then_bytes(_LLAMA3_REGEX), True, True) for name in ("llama-bpe", "llama3", "llama-v3")},
    **{name: (_split_then_bytes(_LLAMA3_REGEX), False, False) for name in ("smaug-bpe", "dbrx")},
    **{name: (_split_then_bytes(_QWEN2_REGEX), False, False) for name in ("qwen2", "deepseek-r1-qwen")},
}

_ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}
# Further end-of-generation tokens llama.cpp stops at (end of turn, end of message).
_EXTRA_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _tokens(meta: Mapping[str, Any], file: str) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFormatError(
            f"{file} has no tokenizer.ggml.tokens: the GGUF carries no vocabulary; re-convert it with "
            "llama.cpp's convert_hf_to_gguf.py, or give the model's Hugging Face folder")
    return tokens


def _token_id(meta: Mapping[str, Any], key: str, n_tokens: int, file: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < n_tokens:
        raise ModelFormatError(
            f"{file}: {key} is {value!r}, not a token id in [0, {n_tokens}): the GGUF's tokenizer metadata "
            "is corrupt; re-download or re-convert it")
    return value


def _pre_tokenizer(meta: Mapping[str, Any], file: str) -> tuple[dict[str, Any], bool, bool]:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        said = f"pre-tokenizer {pre!r}" if pre is not None else "no tokenizer.ggml.pre"
        raise ModelFormatError(
            f"{file} has {said}: edgekit knows the pre-tokenizers {', '.join(sorted(PRE_TOKENIZERS))}; "
            "use a GGUF converted by a recent llama.cpp, or the model's Hugging Face folder")
    return PRE_TOKENIZERS[pre]


def _check_model(meta: Mapping[str, Any], file: str) -> None:
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return
    if model is None:
        raise ModelFormatError(
            f"{file} has no tokenizer.ggml.model: the GGUF carries no tokenizer; re-convert it with "
            "llama.cpp's convert_hf_to_gguf.py, or give the model's Hugging Face folder")
    kind = {"llama": "SentencePiece", "bert": "WordPiece", "t5": "Unigram"}.get(str(model), "this")
    raise ModelFormatError(
        f"{file} has a {kind} tokenizer (tokenizer.ggml.model {model!r}): edgekit converts byte-level BPE "
        "('gpt2') GGUF tokenizers, as in R1-Distill-Qwen/Llama and SmolLM2 GGUFs; give the model's Hugging "
        "Face folder instead")


def check_supported(meta: Mapping[str, Any], file: str = "the GGUF") -> None:
    """Refuse, from scalar metadata only, a tokenizer :func:`tokenizer_json` could not convert exactly: another
    tokenizer model or a pre-tokenizer whose splitting rules edgekit does not know. Checked when the model
    is opened, so a build stops before its export, never with a silently different tokenization."""
    _check_model(meta, file)
    _pre_tokenizer(meta, file)


def _merge_pairs(merges: list[str], file: str) -> list[list[str]]:
    pairs = []
    for merge in merges:
        # Byte-level tokens never contain a space (it is spelled "Ġ"), so the one space is the separator.
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ModelFormatError(
                f"{file}: tokenizer.ggml.merges has the malformed entry {merge!r} (expected two tokens "
                "separated by one space); re-convert the GGUF")
        pairs.append([left, right])
    return pairs


def add_bos_eos(meta: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: the file's flags, else llama.cpp's default for the pre-tokenizer."""
    pre = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre"))
    bos = meta.get("tokenizer.ggml.add_bos_token")
    eos = meta.get("tokenizer.ggml.add_eos_token")
    return (bool(bos) if bos is not None else (pre[2] if pre else False)), bool(eos)


def special_tokens(meta: Mapping[str, Any], file: str = "the GGUF") -> dict[str, Any]:
    """``{"bos_token", "eos_token", "bos_token_id", "eos_token_ids", "add_bos_token"}`` plus ``eos_token_id``,
    ``add_eos_token``, ``unk_token_id`` and ``pad_token_id``.

    ``eos_token_ids`` is the EOS token followed by any end-of-turn / end-of-message token the file names:
    llama.cpp stops generating at all of them.
    """
    tokens = _tokens(meta, file)
    n = len(tokens)
    ids = {name: _token_id(meta, key, n, file) for name, key in _ID_KEYS.items()}
    eos_ids = [i for i in (ids["eos"], *(_token_id(meta, k, n, file) for k in _EXTRA_EOS_KEYS)) if i is not None]
    add_bos, add_eos = add_bos_eos(meta)
    return {
        "bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
        "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "eos_token_ids": list(dict.fromkeys(eos_ids)),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "unk_token_id": ids["unk"],
        "pad_token_id": ids["pad"],
    }


def _post_processor(tokens: list[str], bos: int | None, eos: int | None, add_bos: bool,
                    add_eos: bool) -> dict[str, Any] | None:
    """BOS/EOS around each sequence, as llama.cpp adds them when the file asks for it."""
    before = [bos] if add_bos and bos is not None else []
    after = [eos] if add_eos and eos is not None else []
    if not before and not after:
        return None

    def sequence(name: str, type_id: int) -> list[dict[str, Any]]:
        specials = [{"SpecialToken": {"id": tokens[i], "type_id": type_id}} for i in before + after]
        return [*specials[:len(before)], {"Sequence": {"id": name, "type_id": type_id}}, *specials[len(before):]]

    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in before + after},
    }


def tokenizer_json(meta: Mapping[str, Any], file: str = "the GGUF") -> str:
    """The GGUF's tokenizer as a tokenizer.json document.

    Byte-level BPE over the file's vocabulary and merges, split by the rules its ``tokenizer.ggml.pre``
    names, decoded by the byte-level decoder. Control tokens become special added tokens and user-defined
    ones plain added tokens: both are matched whole in the text, as llama.cpp does, instead of being cut
    into byte pieces. Raises ModelFormatError for any other tokenizer type or an unknown pre-tokenizer.
    """
    _check_model(meta, file)
    tokens = _tokens(meta, file)
    pre_tokenizer, ignore_merges, _ = _pre_tokenizer(meta, file)
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not merges:
        raise ModelFormatError(
            f"{file} has a BPE tokenizer without tokenizer.ggml.merges: re-convert the GGUF with llama.cpp's "
            "convert_hf_to_gguf.py")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFormatError(
            f"{file}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens; "
            "re-convert the GGUF")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # A repeated string (padding entries of some vocabularies) keeps its first id, as lookup does in
        # llama.cpp; the later ids are unreachable from text either way.
        vocab.setdefault(token, i)
    added = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind == CONTROL}
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, USER_DEFINED) and vocab[token] == i
    ]
    st = special_tokens(meta, file)
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        # llama.cpp normalizes nothing for byte-level BPE, and neither does the model's converter input.
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(tokens, st["bos_token_id"], st["eos_token_id"], st["add_bos_token"],
                                          st["add_eos_token"]),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": _merge_pairs(merges, file),
        },
    }
    return json.dumps(doc, ensure_ascii=False)
