"""compare_peers.py's verdicts and output: the targets of issues 4 and 5, the table, the chart.

A target compares edgekit with the target rows of its own precision only: edgekit at fp32 against 4-bit peers
(or the reverse) says nothing about either, so such a comparison is reported as not compared, never as met or
not met. llama.cpp Q4_1 (SmolLM2's GGUF as is) is a target row: it is the format edgekit's int4 bundle of
SmolLM2 carries over, the like-for-like comparison of the two runtimes' kernels.
"""

from __future__ import annotations

from pathlib import Path

TARGET_ROWS = ("llama.cpp Q4_0", "llama.cpp Q4_1 (GGUF as is)", "llama.cpp (same GGUF)", "onnxruntime-genai int4")


def targets(rows: list[dict], rss_budget: float) -> list[dict]:
    ok = [r for r in rows if "error" not in r.get("speed", {"error": 1})]
    ek = next((r for r in ok if r["peer"] == "edgekit"), None)
    peers = [r for r in ok if r["label"] in TARGET_ROWS]
    out = []
    if ek is None:
        return [{"target": "edgekit ran", "met": False, "detail": rows[0].get("speed", {}).get("error", "")}]
    e = ek["speed"]
    other = sorted({r.get("precision", "?") for r in peers if r.get("precision") != ek.get("precision")})
    if other:   # a 4-bit peer against an fp32 edgekit says nothing about either: refuse to mark it
        out.append({"target": "decode, TTFT and fidelity against the peers", "met": None,
                    "detail": f"not compared: edgekit runs {ek['precision']}, the target rows run "
                              f"{', '.join(other)} (use --precision {other[0]})"})
    peers = [r for r in peers if r.get("precision") == ek.get("precision")]
    if peers:
        fast = max(peers, key=lambda r: r["speed"]["decode_tok_s"])
        ratio = e["decode_tok_s"] / fast["speed"]["decode_tok_s"]
        out.append({"target": f"decode >= 1.0x the faster peer ({fast['label']})", "met": ratio >= 1.0,
                    "detail": f"{e['decode_tok_s']:.1f} vs {fast['speed']['decode_tok_s']:.1f} tok/s = {ratio:.2f}x"})
        quick = min(peers, key=lambda r: r["speed"]["ttft_ms"])
        out.append({"target": f"TTFT <= the faster peer's ({quick['label']})",
                    "met": e["ttft_ms"] <= quick["speed"]["ttft_ms"],
                    "detail": f"{e['ttft_ms']:.1f} vs {quick['speed']['ttft_ms']:.1f} ms"})
    out.append({"target": "peak RSS <= bundle weights + KV + 100 MiB", "met": e["peak_rss_mib"] <= rss_budget,
                "detail": f"{e['peak_rss_mib']:.0f} vs {rss_budget:.0f} MiB"})
    fid = [r for r in peers if "top1_agreement" in r.get("fidelity", {})]
    if "top1_agreement" in ek.get("fidelity", {}) and fid:
        f = ek["fidelity"]
        best_top1 = max(r["fidelity"]["top1_agreement"] for r in fid)
        best_kl = min(r["fidelity"]["mean_kl"] for r in fid)
        out.append({"target": "fidelity: higher top-1 and lower KL than each peer",
                    "met": f["top1_agreement"] > best_top1 and f["mean_kl"] < best_kl,
                    "detail": f"top-1 {f['top1_agreement'] * 100:.2f}% vs best peer {best_top1 * 100:.2f}%; "
                              f"KL {f['mean_kl']:.5f} vs {best_kl:.5f}"})
    return out


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def table(res: dict, threads: int) -> str:
    lines = [f"{res['model']}: threads {threads}, prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new "
             f"tokens (greedy, EOS ignored), context {res['context']}, median of {res['runs']} run(s)",
             f"{'':28} {'TTFT ms':>8} {'decode tok/s':>12} {'GB/s':>5} {'%bw':>4} {'peak RSS MiB':>12} "
             f"{'top-1 %':>8} {'KL':>9}"
             f"   edgekit/peer: {'TTFT':>6} {'decode':>6} {'RSS':>6}   {'others':>6}"]
    busy = []
    ek = next((r["speed"] for r in res["rows"] if r["peer"] == "edgekit" and "error" not in r["speed"]), None)
    for r in res["rows"]:
        s, f = r.get("speed", {}), r.get("fidelity", {})
        if "error" in s:
            lines.append(f"{r['label']:28} failed: {s['error']}  (log: {s.get('log')})")
            continue
        ratios = ""
        if ek and r["peer"] != "edgekit":
            ratios = (f"{'':15}{ek['ttft_ms'] / s['ttft_ms']:>6.2f}x {ek['decode_tok_s'] / s['decode_tok_s']:>5.2f}x "
                      f"{ek['peak_rss_mib'] / s['peak_rss_mib']:>5.2f}x")
        ratios = f"{ratios:<37}   {s['other_cores']:>6.2f}"
        if s["other_cores"] > 0.25:
            busy.append(r["label"])
        top1 = f.get("top1_agreement")
        bw = (f"{s['gb_s']:>5.1f} {s['of_bandwidth'] * 100:>3.0f}%" if "gb_s" in s else f"{'-':>5} {'-':>4}")
        lines.append(f"{r['label']:28} {s['ttft_ms']:>8.1f} {s['decode_tok_s']:>12.1f} {bw} {s['peak_rss_mib']:>12.0f} "
                     f"{_fmt(top1 and top1 * 100, '8.2f', f.get('error') and 'error' or '-'):>8} "
                     f"{_fmt(f.get('mean_kl'), '9.5f'):>9}   {ratios}")
    for peer, why in res["skipped"].items():
        lines.append(f"{peer:28} {why}")
    lines.append("others: CPU cores the rest of the machine kept busy during that peer's speed run (should be ~0)")
    if busy:
        lines.append(f"WARNING: other work ran during {', '.join(busy)}: those numbers are not comparable; run again "
                     "on an idle machine")
    if res["fidelity_note"]:
        lines.append(res["fidelity_note"])
    for what, b in res["builds"].items():
        if "child_peak_rss_mib" in b and b.get("seconds", 0) > 5:
            lines.append(f"  preparation: {what}: {b['seconds']:.0f} s, peak RSS {b['child_peak_rss_mib']:.0f} MiB")
    for t in res["targets"]:
        verdict = "NOT COMPARED" if t["met"] is None else "MET" if t["met"] else "NOT MET"
        lines.append(f"  target {t['target']}: {verdict} ({t['detail']})")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = (("decode_tok_s", "decode tok/s (higher is better)"), ("ttft_ms", "TTFT ms (lower is better)"),
               ("peak_rss_mib", "peak RSS MiB (lower is better)"))
    fig, axes = plt.subplots(len(results), 3, figsize=(15, 3.2 * len(results)), squeeze=False)
    for i, res in enumerate(results):
        rows = [r for r in res["rows"] if "error" not in r.get("speed", {"error": 1})]
        for j, (key, title) in enumerate(metrics):
            ax = axes[i][j]
            values = [r["speed"][key] for r in rows]
            ax.barh([r["label"] for r in rows], values,
                    color=["#2a7" if r["peer"] == "edgekit" else "#888" for r in rows])
            ax.invert_yaxis()
            ax.set_title(f"{res['key']}: {title}", fontsize=9)
            for k, v in enumerate(values):
                ax.text(v, k, f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
