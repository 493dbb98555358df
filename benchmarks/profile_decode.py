"""Where a decode step's time goes: per-op-type time per token, bytes read per token, achieved GB/s.

    python benchmarks/profile_decode.py BUNDLE [--threads 2] [--filled 64,1024] [--tokens 32] [--json]

For each filled length F it prefills F tokens (random ids, chunks of the bundle's prefill size) once, then
times --tokens one-token decode steps from those F rows (three times, median: tok/s), and once more in a
second session with onnxruntime's profiler on (per-node kernel times, summed by op type and divided by the
number of steps). Everything runs through
``edgekit.runtime``'s own decoder (``OrtDecoder``: same session options, same I/O binding).

Bytes read per token are counted from the graph, as the CPU kernels hold the weights after load:

- MatMulNBits: packed codes (N * blocks * block_size * bits / 8) plus MLAS's per-block fp32 scale and, at
  accuracy_level 4 (int8 activations), its per-block fp32 block sum: bits + 64 / block_size bits per weight;
  plus uint8 zero points when the node has them;
- the offsets product of asymmetric GGUF blocks (ReduceSum -> MatMul/Gemm with a folded (blocks, N) fp32
  constant): 32 / block_size bits per weight;
- GroupQueryAttention: the filled K and V rows, 2 * kv_heads * F * head_dim * itemsize per layer (what it has
  to read if it reads only the filled part of the static buffer);
- everything else (norms, activations, the embedding's few rows) is counted as 0: kilobytes per token.

Achieved GB/s = bytes per token x plain tok/s; the fraction of --bandwidth (GB/s the machine can read with
these threads; default 34, measured on the 2-core reference machine) is printed next to it.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def weight_bytes_per_token(graph_path: Path, spec, filled: int, kv_itemsize: int) -> dict[str, int]:
    """Bytes each op type reads per decode step (see the module docstring for what is counted)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    out: dict[str, int] = collections.Counter()
    offsets = {n.name: n.op_type for n in model.graph.node if n.name.endswith("/Offsets")}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            n, k, bits, bs = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
            blocks = -(-k // bs)
            per_block = bs * bits // 8 + 4 + (4 if attrs.get("accuracy_level", 0) == 4 else 0)
            zp = n * -(-blocks * bits // 8) if len(node.input) > 3 and node.input[3] else 0
            out["MatMulNBits"] += n * blocks * per_block + zp
            if node.name.replace("/MatMulNBits", "/Offsets") in offsets:   # (N, blocks) fp32 after folding
                out[offsets[node.name.replace("/MatMulNBits", "/Offsets")] + " (offsets)"] += n * blocks * 4
        elif node.op_type == "GroupQueryAttention":
            out["GroupQueryAttention"] += 2 * spec.num_kv_heads * filled * spec.head_dim * kv_itemsize
    return dict(out)


def parse_profile(path: str, windows: list[tuple[int, int]]) -> list[tuple[dict[str, float], dict[str, float]]]:
    """For each (first run, number of runs) window of the trace's model runs (in order): milliseconds per run
    by op type (with "(whole run)"), and by node name with layer numbers replaced by *."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    nodes = sorted((e["ts"], e["dur"], e.get("args", {}).get("op_name", "?"), e["name"][:-len("_kernel_time")])
                   for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"))
    out = []
    for first, count in windows:
        span = runs[first:first + count]
        lo, hi = span[0][0], span[-1][1]
        per_op: dict[str, float] = collections.Counter()
        per_node: dict[str, float] = collections.Counter()
        for ts, dur, op, name in nodes:
            if lo <= ts <= hi:
                per_op[op] += dur / 1000 / count
                # layer nodes summed over layers: "layers.*.gate_up/MatMulNBits"
                per_node[".".join("*" if p.isdigit() else p for p in name.split("."))] += dur / 1000 / count
        per_op["(whole run)"] = sum(b - a for a, b in span) / 1000 / count
        out.append((dict(per_op), dict(per_node)))
    return out


def prefill(decoder, filled: int, chunk: int, rng) -> int:
    """Fill the cache with ``filled`` random ids; the greedy next token."""
    decoder.reset()
    ids = rng.integers(0, decoder.vocab, filled)
    for a in range(0, filled, chunk):
        logits = decoder.step(ids[a:a + chunk])
    return int(np.argmax(logits))


def decode_steps(decoder, filled: int, first: int, tokens: int) -> float:
    """Keep the first ``filled`` rows, then time ``tokens`` greedy one-token steps; tok/s."""
    decoder.keep(filled)
    nxt, t0 = first, time.perf_counter()
    for _ in range(tokens):
        nxt = int(np.argmax(decoder.step(np.array([nxt], np.int64))))
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--filled", default="64,1024", help="comma-separated filled lengths [default: 64,1024]")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per filled length [default: 32]")
    ap.add_argument("--bandwidth", type=float, default=34.0, help="machine read GB/s for the fraction [34]")
    ap.add_argument("--kv-dtype", default=None, help="load with this KV cache dtype (e.g. int8) if the bundle has it")
    ap.add_argument("--top", type=int, default=8, help="nodes (summed over layers) listed by time [8]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgekit.runtime.model import load

    filled = [int(x) for x in args.filled.split(",")]
    capacity = max(filled) + args.tokens + 1
    kw = {"kv_dtype": args.kv_dtype} if args.kv_dtype else {}
    t0 = time.perf_counter()
    model = load(args.bundle, max_context=capacity, threads=args.threads, **kw)
    load_s = time.perf_counter() - t0
    m, spec = model.manifest, model.spec
    graph = m.path(m.graph["file"])
    dec = model.decoder
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    decode_steps(dec, 8, prefill(dec, 8, model.prefill_chunk, rng), 2)     # warm-up: first-run allocations
    warm_s = time.perf_counter() - t0

    rows = []
    for f in filled:
        first = prefill(dec, f, model.prefill_chunk, rng)          # once per length; each run keeps its f rows
        tps = statistics.median(decode_steps(dec, f, first, args.tokens) for _ in range(3))
        rows.append({"filled": f, "tok_s": tps})
    kv_dtype, kv_itemsize, chunk = dec.kv_dtype_name, np.dtype(dec.dtype).itemsize, model.prefill_chunk
    del model, dec, kw          # one session at a time: a 7B holds ~8 GB
    gc.collect()

    from edgekit.runtime.ort_backend import OrtDecoder

    prof = OrtDecoder(str(graph), dialect=m.dialect, spec=spec, capacity=capacity, kv_dtype=kv_dtype,
                      threads=args.threads, profile_prefix=os.path.join(tempfile.mkdtemp(), "decode"))
    windows, done = [], 0
    for row in rows:            # profiling slows a run: timed above without it, profiled here once per length
        decode_steps(prof, row["filled"], prefill(prof, row["filled"], chunk, rng), args.tokens)
        prefill_runs = -(-row["filled"] // chunk)
        windows.append((done + prefill_runs, args.tokens))
        done += prefill_runs + args.tokens
    trace = prof.session.end_profiling()
    for row, (ms, by_node) in zip(rows, parse_profile(trace, windows)):
        row["ms_per_op"] = ms
        row["ms_per_node"] = dict(sorted(by_node.items(), key=lambda kv: -kv[1])[:args.top])
        row["bytes"] = weight_bytes_per_token(graph, spec, row["filled"], kv_itemsize)
        total = sum(row["bytes"].values())
        row["bytes_per_token"] = total
        row["gb_s"] = total * row["tok_s"] / 1e9
        row["of_bandwidth"] = row["gb_s"] / args.bandwidth
    os.unlink(trace)
    result = {"bundle": str(args.bundle), "threads": args.threads, "load_s": load_s, "warmup_s": warm_s,
              "kv_dtype": kv_dtype, "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.bundle}: load {load_s:.1f} s, warm-up {warm_s:.2f} s, {args.threads} threads, KV {kv_dtype}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for row in rows:
        whole = row["ms_per_op"].get("(whole run)", 0.0)
        print(f"\nfilled {row['filled']}: {row['tok_s']:.2f} tok/s, {row['bytes_per_token'] / 2**20:.1f} MiB/token, "
              f"{row['gb_s']:.1f} GB/s ({row['of_bandwidth']:.0%} of {args.bandwidth:g} GB/s); "
              f"profiled run {whole:.2f} ms/token")
        print(f"  {'op type':<34} {'ms/token':>9} {'share':>6} {'MiB/token':>10} {'GB/s':>6}")
        ops = sorted(((k, v) for k, v in row["ms_per_op"].items() if k != "(whole run)"), key=lambda kv: -kv[1])
        for op, ms in ops:
            b = row["bytes"].get(op, 0) + row["bytes"].get(op + " (offsets)", 0)
            gbs = f"{b / ms / 1e6:6.1f}" if b and ms else "     -"
            print(f"  {op:<34} {ms:9.3f} {ms / whole if whole else 0:6.1%} {b / 2**20:10.1f} {gbs}")
        print(f"  {'nodes (all layers)':<34} {'ms/token':>9} {'share':>6}")
        for name, ms in row["ms_per_node"].items():
            print(f"  {name[:34]:<34} {ms:9.3f} {ms / whole if whole else 0:6.1%}")


if __name__ == "__main__":
    sys.exit(main())
