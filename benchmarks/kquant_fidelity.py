"""What the compact storage of K-quant GGUFs costs in fidelity, size and speed, on a real model.

R1-Distill's Q4_K_M files store most linears as Q4_K and ffn_down / attn_v / the LM head as Q6_K. onnxruntime's
MatMulNBits has no fast 6-bit form, so an INT4 bundle either keeps Q6_K's codes as 8-bit (the default, ~1.1x
the GGUF) or re-quantizes those tensors to 4 bits (`--compact-blocks`, <= 1x). This script measures the
difference on SmolLM2-135M with its ffn_down stored as Q6_K (the one SmolLM2 linear whose width is a multiple of
256, as K-quants need), against that file's own fp32 weights, teacher-forced (`edgekit eval`).

    python benchmarks/kquant_fidelity.py [--tokens 512] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gguf_blocks import quantize_q6_k  # noqa: E402


def write_q6k_variant(src: Path, dest: Path) -> Path:
    """``src`` with every ffn_down re-stored as Q6_K (from its dequantized values); all else byte for byte."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]
        if "ffn_down" in t.name:
            w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            writer.add_tensor(t.name, quantize_q6_k(w), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-kquant"))
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from edgekit.sources import packaged_model_path

    variant = args.work / "SmolLM2-135M-Instruct.Q4_1-ffn_down-Q6_K.gguf"
    if not variant.exists():
        write_q6k_variant(packaged_model_path("smollm2"), variant)
    edgekit = [sys.executable, "-m", "edgekit"]
    rows = []
    for label, extra in (("exact (default)", []), ("--compact-blocks", ["--compact-blocks"])):
        for level in ("4", "0"):
            bundle = args.work / f"b-{'compact' if extra else 'exact'}-{level}"
            subprocess.run(edgekit + ["build", str(variant), "--target", "cpu", "-p", "int4", "-c", "1024",
                                      "--accuracy-level", level, "-o", str(bundle), "--force", "--no-cache"] + extra,
                           check=True, capture_output=True)
            t0 = time.perf_counter()
            out = subprocess.run(edgekit + ["eval", str(bundle), "-r", str(variant), "--max-tokens",
                                            str(args.tokens), "--threads", "2", "--json",
                                            "--work-dir", str(args.work / "ref")],
                                 check=True, capture_output=True, text=True)
            fid = json.loads(out.stdout)
            bench = json.loads(subprocess.run(edgekit + ["bench", str(bundle), "--prompt-tokens", "41",
                                                         "--new-tokens", "64", "--runs", "3", "--threads", "2",
                                                         "--json"], check=True, capture_output=True,
                                              text=True).stdout)
            manifest = json.loads((bundle / "manifest.json").read_text())
            rows.append((label, level, manifest["memory"]["weights_bytes"], fid, bench, time.perf_counter() - t0))
    tensor_bytes = _tensor_bytes(variant)
    print(f"SmolLM2-135M, ffn_down as Q6_K, others Q4_1 / Q8_0 (GGUF tensors {tensor_bytes:,} B), {args.tokens} "
          "tokens teacher-forced against the file's own fp32 weights, 2 threads")
    print(f"{'storage':<18} {'level':>5} {'weights B':>12} {'x GGUF':>7} {'top-1 %':>8} {'KL':>8} {'decode tok/s':>13}")
    for label, level, weights, fid, bench, _ in rows:
        decode = _decode_rate(bench)
        print(f"{label:<18} {level:>5} {weights:12,} {weights / tensor_bytes:7.3f} {100 * fid['top1_agreement']:8.2f} "
              f"{fid['mean_kl']:8.5f} {decode:13.1f}")


def _decode_rate(bench: dict) -> float:
    r = (bench.get("cases") or bench.get("results") or [bench])[0]
    for key in ("decode_tok_s", "decode_tokens_per_s", "decode_tok_s_median"):
        if key in r:
            value = r[key]
            return value["median"] if isinstance(value, dict) else float(value)
    return float("nan")


def _tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


if __name__ == "__main__":
    main()
