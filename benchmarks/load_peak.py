"""Load-time memory of a bundle's graph in onnxruntime: as edgekit loads it, and pre-optimized with its
prepacked weights in a memory-mapped file.

    python benchmarks/load_peak.py BUNDLE [--threads 2] [--work DIR] [--keep]

Each measurement runs in its own process and prints load seconds, peak RSS (VmHWM), and resident memory split
into anonymous (heap: what the kernel cannot drop) and file-backed (mapped pages it can) after the session
exists and after malloc_trim:

1. ``default``: the bundle's model.onnx with edgekit's session options (constant folding of the compact block
   scales and MatMulNBits prepacking happen in this process: the load-time spike);
2. ``prepared``: the same graph written once by onnxruntime itself (``optimized_model_filepath``, extended
   optimizations, every initializer >= 1 KiB external, ``session.save_external_prepacked_constant_initializers``
   = 1), then loaded: nothing is folded or repacked at load, the prepacked weights are mapped from the file.
   The file holds the original initializers, the folded ones and the prepacked ones (R1-7B: 13.5 GB next to a
   5.2 GB bundle), and its prepacked layout is specific to the CPU's kernels (AVX-512, AVX2, NEON): it has to
   be written on the device that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out


def child(kind: str, model: str, threads: int, out: str | None) -> None:
    import ctypes

    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    if kind == "prepare":
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        o.optimized_model_filepath = out
        o.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                   Path(out).name + ".data")
        o.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        o.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    t0 = time.perf_counter()
    session = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - t0
    loaded = _status()   # while the session is alive: what it holds
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(json.dumps({"seconds": seconds, "loaded": loaded, "trimmed": _status()}))
    del session   # alive until every reading above was taken


def run(kind: str, model: str, threads: int, out: str | None = None) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", kind, model, str(threads), out or ""],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] or None)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="where the prepared graph goes [a temporary folder]")
    ap.add_argument("--keep", action="store_true", help="keep the prepared graph")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-prepared-"))
    work.mkdir(parents=True, exist_ok=True)
    graph = str(args.bundle / "model.onnx")
    prepared = str(work / "model.onnx")
    rows = [("default", run("load", graph, args.threads))]
    prep = run("prepare", graph, args.threads, prepared)
    size = sum(f.stat().st_size for f in work.iterdir())
    rows.append(("prepared", run("load", prepared, args.threads)))
    bundle = sum(f.stat().st_size for f in args.bundle.iterdir() if f.name.startswith("model.onnx"))
    print(f"{args.bundle}: graph files {bundle / 2**20:,.0f} MiB; prepared copy {size / 2**20:,.0f} MiB written in "
          f"{prep['seconds']:.0f} s (peak {prep['loaded']['VmHWM']:,} MiB); load average {os.getloadavg()[0]:.1f}")
    print(f"{'load':<10} {'seconds':>8} {'peak MiB':>9} {'resident':>9} {'anon':>7} {'file':>7}   after malloc_trim")
    for name, r in rows:
        t = r["trimmed"]
        print(f"{name:<10} {r['seconds']:>8.1f} {r['loaded']['VmHWM']:>9,} {t['VmRSS']:>9,} {t['RssAnon']:>7,} "
              f"{t['RssFile']:>7,}")
    if not args.keep and args.work is None:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
