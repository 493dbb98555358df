"""``edgekit build``: a model -> a bundle for a target."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import StageProgress, cli, parse_context


def _default_cache() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgekit" / "exports"


@cli.command("build")
@click.argument("model")
@click.option("--target", "-t", "target_name", required=True, metavar="T", help="Device target (edgekit targets).")
@click.option("--precision", "-p", default=None, metavar="P",
              help="int4, int8, fp16 or fp32 [default: int4].")
@click.option("--context", "-c", "context_text", default="4096", show_default=True, metavar="N",
              help="Maximum context (the static KV cache size), e.g. 4096 or 8k.")
@click.option("--backend", "-b", default=None, metavar="B", help="tensorrt, onnxruntime-cuda, onnxruntime-cpu or "
              "ggml-cpu [default: the target's; ggml-cpu for a GGUF on the cpu target].")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write [default: ./<model>-<target>-<precision>].")
@click.option("--force", is_flag=True, help="Replace an existing output; build even when the plan does not fit.")
@click.option("--method", type=click.Choice(["auto", "rtn", "awq"]), default="auto", show_default=True,
              help="INT4/INT8: auto = keep a GGUF's own blocks where exact, activation-aware scaling for "
                   "checkpoints; rtn = round to nearest; awq = activation-aware scaling.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128"]), default="32", show_default=True,
              help="INT4 block size along the input dimension.")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="onnxruntime MatMulNBits: 4 = int8 compute (fast, default), 0 = fp32 compute (exact).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Your own calibration text (.txt paragraphs or .jsonl chat messages) for --method awq.")
@click.option("--no-lossless", is_flag=True, help="Re-quantize GGUF blocks instead of carrying them over.")
@click.option("--compact-blocks", is_flag=True,
              help="INT4 from a GGUF: re-quantize its 5-/6-bit blocks (Q6_K, Q5_0) to 4 bits instead of keeping "
                   "them exactly as 8-bit codes: <= 1x the GGUF's size instead of ~1.1x, at a fidelity cost.")
@click.option("--lm-head", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="INT4/INT8 builds: the LM head's precision (int4 is smaller and faster, less faithful).")
@click.option("--kv-cache", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="KV cache storage: float (the graph's float type) or int8 with per-channel scales (onnxruntime "
                   "backends, calibrated on the calibration text; a quarter of float32's bytes, half of fp16's).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where exports are kept for reuse by later builds [default: $XDG_CACHE_HOME/edgekit or "
                   "~/.cache/edgekit].")
@click.option("--no-cache", is_flag=True, help="Neither reuse nor keep exports.")
@click.option("--eval", "eval_tokens", type=click.IntRange(1), default=None, metavar="N",
              help="Then score the bundle against its own full-precision source on N tokens (top-1, KL, "
                   "perplexity) and record it in the manifest.")
def build_cmd(model: str, target_name: str, precision: str | None, context_text: str, backend: str | None,
              output: Path | None, force: bool, method: str, block_size: str, accuracy_level: str | None,
              calibration: Path | None, no_lossless: bool, compact_blocks: bool, lm_head: str, cache_dir: Path | None,
              kv_cache: str, no_cache: bool, eval_tokens: int | None) -> None:
    """Build MODEL (a folder, a .gguf file, a hub id or `smollm2`) into a bundle for a target."""
    from ..build import QuantOptions, build, preflight
    from ..build.target import check_combination, load_target

    target = load_target(target_name)
    if precision:
        precision = precision.strip().lower()
        check_combination(target, backend, precision)
    context = parse_context(context_text)
    if calibration is not None:
        from ..build.calibration import load_samples

        load_samples(calibration)             # a bad file fails now, not after minutes of work
    quant = QuantOptions(block_size=int(block_size), method=method, calibration=calibration,
                         accuracy_level=None if accuracy_level is None else int(accuracy_level),
                         lossless=not no_lossless, head_bits=4 if lm_head == "int4" else 8, exact=not compact_blocks,
                         kv_cache=kv_cache)
    bp = preflight(model, target, precision=precision, context=context, backend=backend, force=force, quant=quant)
    source = bp.source
    if output is None:
        # a GGUF's file name says more than its general.name (SmolLM2's is "Smollm2 135M 8k Lc100K Mix1 Ep2")
        stem = source.path.stem if source.kind == "gguf" else (source.spec.name or Path(source.display).name)
        stem = stem.replace("/", "-").replace(" ", "-")
        output = Path(f"{stem}-{target.name}-{bp.precision}")
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists: pass --force to replace it, or choose another -o")
    click.echo(f"building {source.spec.name or source.display} ({source.spec.parameters:,} parameters) for "
               f"{target.name} at {bp.precision}, context {bp.plan.context} -> {output}", err=True)
    with StageProgress() as progress:
        result = build(bp, target, output=output, force=force, progress=progress,
                       cache_dir=None if no_cache else (cache_dir or _default_cache()), eval_tokens=eval_tokens)
    m = result.manifest
    q = m.get("quantization")
    if q:
        carried = sum(q.get("lossless", {}).values())
        head = q.get("embedding_and_lm_head", "int8")      # "int8" or "embedding int8, LM head int4"
        click.echo(f"quantization: {q['method']}, {q['weights']} block {q['block_size']}, "
                   + ("embedding/LM head int8" if head == "int8" else head)
                   + (f", {carried} tensors carried over exactly from the GGUF" if carried else "")
                   + "".join(f"; {n} {why}" for why, n in q.get("requantized", {}).items()), err=True)
    if m.get("fidelity"):
        f = m["fidelity"]
        click.echo(f"fidelity vs the full-precision source on {f['tokens']} tokens: top-1 "
                   f"{100 * f['top1_agreement']:.1f}%, mean KL {f['mean_kl']:.4f}, perplexity {f['perplexity']:.3f} "
                   f"(reference {f['reference_perplexity']:.3f})", err=True)
    size = sum(f["size"] for f in m["files"].values())
    click.echo(f"bundle {result.bundle}: {len(m['files'])} files, {size / 2**20:.1f} MiB, "
               f"{m['backend']} ({m['dialect']} graph), runtime needs {m['memory']['total_bytes'] / 2**20:.0f} MiB "
               f"at context {m['max_context']}")
