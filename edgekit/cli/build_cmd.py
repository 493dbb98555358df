"""``edgekit build``: a model -> a bundle for a target."""

from __future__ import annotations

import time
from pathlib import Path

import click

from . import cli
from .plan_cmd import _parse_context


class _Progress:
    """Stage progress on stderr: a rich bar when rich is installed, plain lines otherwise."""

    def __init__(self):
        self.bar = None
        self.tasks: dict[str, int] = {}
        self.t0 = time.perf_counter()
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.console import Console

            self.bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        except ImportError:
            pass

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            if done in (0, total):
                click.echo(f"{stage}: {done}/{total}", err=True)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=max(total, 1))
        self.bar.update(self.tasks[stage], completed=done if total else 1)


@cli.command("build")
@click.argument("model")
@click.option("--target", "-t", "target_name", required=True, metavar="T", help="Device target (edgekit targets).")
@click.option("--precision", "-p", default=None, metavar="P",
              help="fp32 or fp16 [default: fp16 where the target runs it, else fp32].")
@click.option("--context", "-c", "context_text", default="4096", show_default=True, metavar="N",
              help="Maximum context (the static KV cache size), e.g. 4096 or 8k.")
@click.option("--backend", "-b", default=None, metavar="B", help="tensorrt, onnxruntime-cuda or onnxruntime-cpu "
              "[default: the target's].")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write [default: ./<model>-<target>-<precision>].")
@click.option("--force", is_flag=True, help="Replace an existing output; build even when the plan does not fit.")
def build_cmd(model: str, target_name: str, precision: str | None, context_text: str, backend: str | None,
              output: Path | None, force: bool) -> None:
    """Build MODEL (a folder, a .gguf file, a hub id or `smollm2`) into a bundle for a target."""
    from ..build import build, default_precision
    from ..sources import resolve
    from ..target import check_combination, load_target

    target = load_target(target_name)
    if precision:
        precision = precision.strip().lower()
        check_combination(target, backend, precision)
    context = _parse_context(context_text)
    source = resolve(model)
    chosen = precision or default_precision(target, backend)
    if output is None:
        stem = (source.spec.name or Path(source.display).stem).replace("/", "-").replace(" ", "-")
        output = Path(f"{stem}-{target.name}-{chosen}")
    click.echo(f"building {source.spec.name or source.display} ({source.spec.parameters:,} parameters) for "
               f"{target.name} at {chosen}, context {context} -> {output}", err=True)
    with _Progress() as progress:
        result = build(source, target, output=output, precision=chosen, context=context, backend=backend,
                       force=force, progress=progress)
    m = result.manifest
    size = sum(f["size"] for f in m["files"].values())
    click.echo(f"bundle {result.bundle}: {len(m['files'])} files, {size / 2**20:.1f} MiB, "
               f"{m['backend']} ({m['dialect']} graph), runtime needs {m['memory']['total_bytes'] / 2**20:.0f} MiB "
               f"at context {m['max_context']}")
