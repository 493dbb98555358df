"""``edgekit inspect`` and ``edgekit verify``: look at a bundle, and check it is intact."""

from __future__ import annotations

import re
from typing import Any

import click

from ..runtime.bundle import read_manifest, verify
from ..units import fmt_bytes
from ._common import cli, echo_json

# Manifest strings are untrusted: escape control characters so a bundle cannot drive the terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(value: Any) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def _summary(m) -> list[str]:
    model, src, tgt, mem, tok, gen = m.model, m.source, m.target, m.memory, m.tokenizer, m.generation
    cc = f", compute capability {_clean(tgt['compute_capability'])}" if tgt["compute_capability"] is not None else ""
    name = model.get("name") or src["name"]
    lines = [
        f"bundle      {_clean(m.folder)}  (id {m.id}, {_clean(m.schema)}, edgekit {_clean(m.edgekit_version)}, "
        f"created {_clean(m.created)})",
        f"model       {_clean(name)}: {_clean(model['architecture'])}, {_count(model['parameters'])} parameters, "
        f"{model['num_layers']} layers",
        f"source      {_clean(src['kind'])} {_clean(src['name'])} (sha256 {_clean(src['sha256'][:12])}...)",
        f"target      {_clean(tgt['name'])} ({_clean(tgt['kind'])}{cc})",
        f"backend     {m.backend} (graph dialect {m.dialect}), precision {m.precision}",
        f"context     {m.max_context} tokens",
        f"memory      {fmt_bytes(mem['total_bytes'])} = weights {fmt_bytes(mem['weights_bytes'])} + KV cache "
        f"{fmt_bytes(mem['kv_cache_bytes'])} ({fmt_bytes(mem['kv_bytes_per_token'])}/token) + workspace "
        f"{fmt_bytes(mem['workspace_bytes'])} + runtime {fmt_bytes(mem.get('overhead_bytes', 0))}",
        *_quantization(m.data.get("quantization")),
        f"tokenizer   {_clean(tok['file'])}, chat template {_clean(tok['chat_template'] or 'none')}",
        f"generation  temperature {_clean(gen['temperature'])}, top_p {_clean(gen['top_p'])}, "
        f"top_k {_clean(gen['top_k'])}, max_new_tokens {_clean(gen['max_new_tokens'])}, "
        f"reasoning {'on' if gen['reasoning'] else 'off'}",
        f"engine      {_clean(m.engine['file']) if m.engine else 'none'}",
    ]
    files = m.files
    total = sum(e["size"] for e in files.values())
    lines.append(f"files       {len(files)} files, {fmt_bytes(total)}")
    width = max((len(_clean(n)) for n in files), default=0)
    for name, entry in sorted(files.items()):
        lines.append(f"  {_clean(name):<{width}}  {fmt_bytes(entry['size']):>10}  sha256 {entry['sha256'][:12]}...")
    return lines


@cli.command("inspect")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect_cmd(bundle: str, as_json: bool) -> None:
    """Show what a bundle contains: model, target, backend, precision, memory, files."""
    m = read_manifest(bundle)
    if as_json:
        echo_json(m.data)
        return
    for line in _summary(m):
        click.echo(line)


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--no-weights", is_flag=True,
              help="Check every file's size but hash only the small files (fast on a device).")
def verify_cmd(bundle: str, no_weights: bool) -> None:
    """Check that every file of a bundle is present, unmodified, and listed (exit 2 if not)."""
    report = verify(bundle, weights=not no_weights)
    report.raise_for_problems()
    click.echo(report.summary())


def _quantization(q) -> list[str]:
    """One line on how INT4/INT8 weights were made (nothing for float bundles)."""
    if not isinstance(q, dict):
        return []
    carried = sum(v for v in (q.get("lossless") or {}).values() if isinstance(v, int))
    text = (f"quantized   {_clean(q.get('method'))}, {_clean(q.get('weights'))} block {_clean(q.get('block_size'))}, "
            f"embedding/LM head {_clean(q.get('embedding_and_lm_head'))}, {_clean(q.get('encoding'))} "
            f"accuracy_level {_clean(q.get('accuracy_level'))}")
    return [text + (f", {carried} tensors carried over exactly from the GGUF" if carried else "")]
