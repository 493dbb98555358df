"""``edgekit targets`` and ``edgekit plan``: which devices exist, and will a model fit one."""

from __future__ import annotations

import click

from ..units import fmt_bytes, parse_size
from ._common import cli, echo_json, parse_context

DEFAULT_PRECISION = "int4"     # the smallest faithful choice on every target (GPU, Jetson and CPU)
DEFAULT_CONTEXT = 4096


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as a JSON list.")
def targets_cmd(as_json: bool) -> None:
    """List the device targets edgekit can plan and build for."""
    from ..build.target import list_targets

    targets = list_targets()
    if as_json:
        echo_json([t.to_dict() for t in targets])
        return
    rows = [[t.name, ", ".join(t.aliases) or "-", t.kind,
             f"{fmt_bytes(t.total_memory_bytes)}{' unified' if t.unified_memory and t.kind != 'cpu' else ''}",
             fmt_bytes(t.budget_bytes), f"{t.bandwidth_gbs:g} GB/s", t.sm or "-",
             ", ".join(b.name + ("*" if b.name == t.default_backend else "") for b in t.backends)]
            for t in targets]
    _table(["name", "aliases", "kind", "memory", "budget", "bandwidth", "SM", "backends (*default)"], rows)


@cli.command("plan")
@click.argument("model")
@click.option("--target", "-t", "target_name", required=True, metavar="T",
              help="Device target (see `edgekit targets`), or the path of a .toml target file.")
@click.option("--precision", "-p", default=None, metavar="P",
              help=f"Weight precision: int4, int8, fp8, fp16, bf16 or fp32 [default: {DEFAULT_PRECISION}; "
                   "a GGUF on ggml-cpu: the file's own].")
@click.option("--context", "-c", "context_text", default=None, metavar="N",
              help=f"Context length in tokens, e.g. 4096 or 32k [default: {DEFAULT_CONTEXT}, capped at the "
                   "model's maximum].")
@click.option("--backend", "-b", default=None, metavar="B",
              help="tensorrt, onnxruntime-cuda, onnxruntime-cpu or ggml-cpu [default: the target's; ggml-cpu for a "
                   "GGUF on the cpu target].")
@click.option("--budget", "budget_text", default=None, metavar="SIZE",
              help="Memory budget instead of the target's default, e.g. 3.5GiB.")
@click.option("--kv-cache", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="KV cache storage: float (the graph's float type) or int8 with per-channel scales (onnxruntime "
                   "backends; a quarter of float32's bytes, half of fp16's).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.pass_context
def plan_cmd(ctx: click.Context, model: str, target_name: str, precision: str, context_text: str | None,
             backend: str | None, budget_text: str | None, kv_cache: str, as_json: bool) -> None:
    """Will MODEL fit the target's memory? MODEL is a folder with config.json, a .gguf file, a hub id or
    `smollm2`. Exits 0 when it fits, 3 when it does not, 2 on bad input."""
    from ..build.memory_plan import choose_backend, own_precision, plan
    from ..build.target import check_combination, load_target
    from ..sources import resolve

    target = load_target(target_name)
    if precision is not None:
        precision = precision.strip().lower()
        check_combination(target, backend, precision)          # fail before reading the model
    budget = parse_size(budget_text) if budget_text is not None else None
    source = resolve(model, config_only=True)
    spec = source.spec
    backend = choose_backend(target, backend, spec, precision)
    precision = precision or own_precision(backend, spec) or DEFAULT_PRECISION
    context = (min(DEFAULT_CONTEXT, spec.max_position_embeddings) if context_text is None
               else parse_context(context_text))
    quant = None
    if kv_cache != "float":
        from ..quant.sizes import QuantSettings

        quant = QuantSettings(kv_cache=kv_cache)
    result = plan(spec, target, precision=precision, context=context, backend=backend, budget=budget, quant=quant)
    build_warning = _build_memory_warning(spec, precision)
    if as_json:
        d = result.to_dict()
        d["model"] = spec.name or source.display
        if build_warning:
            d["warnings"].append(build_warning)
        echo_json(d)
    else:
        _print_plan(result, spec, source.display)
        if build_warning:
            click.echo(f"warning: {build_warning}")
    if not result.fits:
        ctx.exit(3)


def _build_memory_warning(spec, precision: str) -> str | None:
    """A warning when building this model here would need more memory than this machine has free."""
    from ..quant.sizes import BUILDABLE, build_memory_bytes
    from ..runtime.memory import available_memory

    if precision not in BUILDABLE:
        return None
    need = build_memory_bytes(spec, precision)
    have, where = available_memory()
    if need <= have:
        return None
    return (f"building this model at {precision} needs about {fmt_bytes(need)} of memory but this machine has "
            f"{fmt_bytes(have)} available ({where}): build on a machine with more memory, or close other programs")


def _print_plan(p, spec, display: str) -> None:
    name = spec.name or display
    click.echo(f"{name} ({spec.family}, {p.parameters:,} parameters) on {p.target}: "
               f"{p.backend}, {p.precision}, context {p.context}")
    rows = [[w.name, fmt_bytes(w.bytes), w.source] for w in p.weights]
    rows.append([p.kv.name, fmt_bytes(p.kv.bytes), p.kv.source])
    rows += [[f"workspace: {w.name}", fmt_bytes(w.bytes), w.source] for w in p.workspace]
    rows.append([p.overhead.name, fmt_bytes(p.overhead.bytes), p.overhead.source])
    rows.append(["total", fmt_bytes(p.total_bytes), "sum of the lines above"])
    rows.append(["budget", fmt_bytes(p.budget_bytes), p.budget.source])
    rows.append(["largest allocation", fmt_bytes(p.largest_allocation.bytes),
                 f"{p.largest_allocation.name}: {p.largest_allocation.source}"])
    rows.append(["decode speed bound", f"{p.decode_tokens_per_s:.0f} tok/s",
                 "memory bandwidth / bytes read per token (weights + full KV cache); an upper bound"])
    _table(["", "size", "where it comes from"], rows)
    share = 100 * p.total_bytes / p.budget_bytes
    if p.fits:
        click.echo(f"fits: {fmt_bytes(p.total_bytes)} of the {fmt_bytes(p.budget_bytes)} budget ({share:.0f}%); "
                   f"largest context that fits at {p.precision}: {p.max_context}")
    else:
        if p.max_context:
            ctx_text = f"largest context that fits at {p.precision}: {p.max_context}"
        else:
            ctx_text = f"no context fits at {p.precision}"
        by_backend: dict[str, list[str]] = {}
        for b, q in p.fits_with:
            by_backend.setdefault(b, []).append(q)
        alt = (f"fits at context {p.context} as " + "; ".join(f"{b} {', '.join(qs)}" for b, qs in by_backend.items())
               + " (choose with --backend and --precision)" if p.fits_with
               else f"no backend or precision of {p.target} fits at context {p.context}")
        click.echo(f"does not fit: needs {fmt_bytes(p.total_bytes)}, budget {fmt_bytes(p.budget_bytes)} "
                   f"({share:.0f}%); {ctx_text}; {alt}")
    for w in p.warnings:
        click.echo(f"warning: {w}")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """A table with rich when it is installed (the build extra), plain aligned text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        for r in [headers, *rows]:
            click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        return
    table = Table(*headers, box=None, pad_edge=False, header_style="bold")
    for r in rows:
        table.add_row(*r)
    console = Console()
    if not console.is_terminal:       # piped or captured: do not squeeze the sources into 80 columns
        console = Console(width=200)
    console.print(table)
