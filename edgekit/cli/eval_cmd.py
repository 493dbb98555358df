"""``edgekit eval``: fidelity of a bundle against its full-precision reference."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import StageProgress, cli, echo_json


@cli.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", "-r", required=True, metavar="MODEL",
              help="The full-precision model the bundle was built from: folder, .gguf, hub id or `smollm2`.")
@click.option("--text", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Score this text (plain text, or .jsonl of chat messages) [default: the reference's own "
                   "answers to the built-in calibration prompts].")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Token positions to score.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads [default: all].")
@click.option("--backend", default="auto", show_default=True,
              help="How to run the bundle: auto, onnxruntime-cpu, onnxruntime-cuda or tensorrt.")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the reference's fp32 export here and reuse it next time [default: a temporary folder].")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def eval_cmd(bundle: Path, reference: str, text: Path | None, max_tokens: int, threads: int | None, backend: str,
             work_dir: Path | None, as_json: bool) -> None:
    """Compare BUNDLE with its reference on the same tokens: top-1 agreement, KL divergence, perplexity."""
    from ..build.evaluate import GENERATED, evaluate

    with StageProgress() as progress:
        result = evaluate(bundle, reference, text=text, max_tokens=max_tokens, threads=threads,
                          backend=backend, work_dir=work_dir, progress=progress)
    if as_json:
        echo_json({"bundle": str(bundle), **result.to_dict(), "seconds": round(result.seconds, 1)})
        return
    scored = ("the reference's answers to calibration prompts" if result.text == GENERATED else result.text)
    click.echo(f"{bundle} against {reference}: {result.tokens} tokens in {result.sequences} sequences ({scored})")
    click.echo(f"  top-1 agreement   {result.top1_agreement * 100:8.2f} %")
    click.echo(f"  mean KL           {result.mean_kl:8.5f} nats/token  (max {result.max_kl:.4f})")
    click.echo(f"  perplexity        {result.perplexity:8.3f}  (reference {result.reference_perplexity:.3f})")
