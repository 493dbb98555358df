"""``edgekit doctor``, ``edgekit engine`` and ``edgekit selftest``: the GPU, TensorRT engines, and checking both.

Nothing here touches TensorRT before the ctypes GPU probe (:mod:`edgekit.gpu.probe`) says there is a GPU:
without one TensorRT crashes the process instead of raising.
"""

from __future__ import annotations

import time

import click

from ..units import fmt_bytes
from ._common import cli, echo_json


# ----- doctor ---------------------------------------------------------------------------------------------
def _doctor_lines(report, support, engine_targets) -> list[tuple[str, str]]:
    from ..gpu.probe import onnxruntime_clash

    d = report.driver
    rows = []
    if d.ok:
        rows.append(("GPU driver", f"ok, supports CUDA {d.driver_version or '?'} ({d.library})"))
        for dev in d.devices:
            rows.append((f"GPU {dev.index}", f"{dev.name}, compute capability {dev.sm}, "
                                             f"{fmt_bytes(dev.total_memory_bytes)}"))
    else:
        label = {"no-driver": "none", "stub-driver": "stub only", "no-device": "no GPU visible"}.get(d.status, "error")
        rows.append(("GPU driver", f"{label}: {d.detail}"))
    j = report.jetson
    rows.append(("Jetson", f"L4T {j.l4t}, JetPack {j.jetpack or 'unknown'}" + (f", {j.model}" if j.model else "")
                 if j else "no (no /etc/nv_tegra_release)"))
    trt = report.tensorrt or ("installed, version unknown" if report.tensorrt_module else None)
    rows.append(("TensorRT", trt or "not installed"))
    rows.append(("cuda-python", report.cuda_python or "not installed"))
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in report.ort_providers) or "none"
    rows.append(("onnxruntime", f"{report.onnxruntime}, providers of this build: {providers}"
                 if report.onnxruntime else "not installed"))
    clash = onnxruntime_clash(report.ort_distributions)
    if clash:
        rows.append(("onnxruntime clash", clash))
    m = report.memory
    if "MemTotal" in m:
        rows.append(("memory", f"{fmt_bytes(m['MemTotal'])} total, {fmt_bytes(m.get('MemAvailable', 0))} available"))
    if "CmaTotal" in m:
        rows.append(("CMA pool", f"{fmt_bytes(m['CmaTotal'])} ({fmt_bytes(m.get('CmaFree', 0))} free): the largest "
                                 "single GPU allocation on a Jetson must fit it"))
    for b in support:
        rows.append((f"backend {b.backend}", f"{'yes' if b.usable else 'no'}: {b.reason}"))
    usable = [b.backend for b in support if b.usable]
    if usable:
        text = "bundles built for backend " + " or ".join(usable) + " run here"
        if "tensorrt" not in usable:
            text += ("; TensorRT bundles run here only with --backend onnxruntime-cpu (their graph on the CPU)"
                     if "onnxruntime-cpu" in usable else "")
        rows.append(("bundles", text))
    else:
        rows.append(("bundles", "none: install onnxruntime (pip install onnxruntime)"))
    if engine_targets:
        rows.append(("engines", f"edgekit engine can build for targets {', '.join(engine_targets)} (same SM)"))
    else:
        rows.append(("engines", "none: edgekit engine and selftest need the tensorrt backend (see above)"))
    return rows


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
def doctor_cmd(as_json: bool) -> None:
    """What this machine can run: GPU driver and devices, Jetson release, TensorRT, onnxruntime, memory."""
    from ..build.target import list_targets
    from ..gpu.probe import backend_support, engine_targets, machine_report

    report = machine_report()
    support = backend_support(report)
    targets = engine_targets(report, list_targets())
    if as_json:
        d = report.to_dict()
        d["backends"] = [{"backend": b.backend, "usable": b.usable, "reason": b.reason} for b in support]
        d["engine_targets"] = targets
        echo_json(d)
        return
    rows = _doctor_lines(report, support, targets)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


# ----- engine ---------------------------------------------------------------------------------------------
def _range(lo: int, opt: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}..{hi} (opt {opt})"


def _plan_lines(plan, bundle: str) -> list[str]:
    lines = [f"engine plan for {bundle}",
             f"model        {plan.model or '?'}: {plan.precision}, KV cache {plan.kv_dtype}, {plan.num_layers} layers",
             f"target       {plan.target} (SM {plan.compute_capability})",
             f"context      {plan.max_context} tokens, prefill chunk {plan.prefill_chunk}, batch 1",
             f"network      flags {', '.join(plan.network_flags)} (the ONNX types decide every precision); "
             f"builder flags: {', '.join(plan.builder_flags) or 'none'}",
             f"workspace    {fmt_bytes(plan.workspace_pool_bytes)} pool limit ({plan.workspace_pool_source})"]
    for i, p in enumerate(plan.profiles):
        lines.append(f"profile {i}    {p.name}: seq {_range(*p.seq)}, past_seq {_range(*p.past)}, "
                     f"{len(p.shapes)} dynamic inputs")
        for s in p.shapes[:2]:
            lines.append(f"  {s.name:<12} min {s.min}  opt {s.opt}  max {s.max}")
        if len(p.shapes) > 2:
            lines.append(f"  ... and {len(p.shapes) - 2} more past_* inputs with the same ranges")
    lines.append(f"files        {plan.engine_file}, timing cache {plan.timing_cache_file} (beside the engine)")
    lines.extend(f"note         {n}" for n in plan.notes)
    return lines


class _ProgressPrinter:
    """Engine builds take minutes: a line when a TensorRT phase starts, and at most one update every 5 s."""

    def __init__(self):
        self.last = 0.0
        self.started = time.monotonic()

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0 or done == total or now - self.last >= 5:
            self.last = now
            count = f" {done}/{total}" if total else ""
            click.echo(f"  [{now - self.started:6.0f}s] {phase}{count}", err=True)


@cli.command("engine")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the build plan (profiles, pool limit, flags) and stop.")
@click.option("--timing-cache", "timing_cache", type=click.Path(dir_okay=False), default=None, metavar="F",
              help="Timing cache file to reuse and update [default: model.timing-cache in the bundle].")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
def engine_cmd(bundle: str, dry_run: bool, timing_cache: str | None, as_json: bool) -> None:
    """Build the TensorRT engine of BUNDLE on this machine's GPU and record it in the manifest.

    Run it on the device (or one with the same GPU and TensorRT): engines are not portable across GPU
    architectures or TensorRT versions.
    """
    from ..build.target import list_targets
    from ..engine.builder import build_bundle_engine, bundle_plan, check_bundle_graph
    from ..engine.compat import check_build
    from ..gpu.probe import probe_driver
    from ..runtime.trt_compat import import_tensorrt

    manifest, target, plan = bundle_plan(bundle)
    report = check_bundle_graph(manifest, target)      # TensorRT's parser rules, before any TensorRT call
    if dry_run:
        if as_json:
            echo_json(plan.to_dict())
        else:
            for line in _plan_lines(plan, bundle):
                click.echo(line)
            quantized = ", ".join(f"{n} {k.upper()}" for k, n in sorted(report.quantized.items())) or "none"
            click.echo(f"graph        passes TensorRT {report.tensorrt}'s parser rules (edgekit's checker; "
                       f"quantized weights: {quantized})")
        return
    probe = probe_driver()
    here = {d.sm for d in probe.devices}
    check_build(target.name, target.sm, probe,         # refuses before TensorRT is imported
                targets_for_sm=[t.name for t in list_targets() if t.sm in here])
    trt = import_tensorrt(probe)
    click.echo(f"building the TensorRT {trt.__version__} engine of {bundle} for {target.name} "
               f"(SM {target.sm}); this takes minutes", err=True)
    written, outcome = build_bundle_engine(bundle, trt=trt, probe=probe, timing_cache=timing_cache,
                                           progress=_ProgressPrinter())
    cache = (f", timing cache {outcome.timing_cache_path.name} ({'reused' if outcome.timing_cache_reused else 'new'})"
             if outcome.timing_cache_path else "")
    click.echo(f"engine {written['engine']['file']} ({fmt_bytes(outcome.engine_bytes)}) built in "
               f"{outcome.seconds:.0f} s with TensorRT {outcome.tensorrt_version} on "
               f"{written['engine']['device']} (SM {written['engine']['compute_capability']}){cache}; "
               "manifest updated")


# ----- selftest -------------------------------------------------------------------------------------------
@cli.command("selftest")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def selftest_cmd(ctx: click.Context, as_json: bool) -> None:
    """Build a tiny 2-layer model's engine on this GPU and compare its logits with onnxruntime on the CPU.

    Exits 0 on pass, 1 on fail, 2 when there is no GPU or TensorRT.
    """
    from ..engine.selftest import run_selftest

    result = run_selftest(progress=None if as_json else _ProgressPrinter())   # BackendUnavailable: exit 2
    if as_json:
        echo_json(result.to_dict())
    else:
        verdict = "PASS" if result.passed else "FAIL"
        click.echo(f"selftest {verdict}: max |logit difference| {result.max_abs_diff:.3g} (tolerance "
                   f"{result.tolerance:.3g}) over {result.steps} steps, greedy tokens "
                   f"{'agree' if result.greedy_agree else 'differ'}; {result.device} (SM {result.compute_capability}), "
                   f"TensorRT {result.tensorrt_version}, engine built in {result.build_seconds:.0f} s"
                   + ("" if result.passed else f": {result.detail}"))
    if not result.passed:
        ctx.exit(1)
