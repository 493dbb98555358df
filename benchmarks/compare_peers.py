"""edgekit against onnxruntime-genai and llama.cpp: same model, same prompt, same threads, one run.

    python benchmarks/compare_peers.py [--threads 2] [--models smollm2,r1-1.5b] [--precision int4]
                                       [--skip-peer llama.cpp] [--quick] [--work DIR] [--out DIR]

For each model it prepares every peer's form of the same weights (cached in --work), then runs each peer in
its own subprocess (so its peak RSS is its own) and measures, with the same 41 prompt token ids and thread
count: time to first token, decode tok/s over 128 greedy tokens (EOS ignored), peak RSS. On SmolLM2 it also
measures fidelity against the fp32 reference on the same teacher-forced text: top-1 agreement and
KL(reference || peer), as ``edgekit eval`` does. The reference is transformers' model of the GGUF
(dequantized to fp32, run by PyTorch), not anything edgekit exported: a reference built by the program
under test would share its mistakes.

Rows: edgekit at --precision; llama.cpp Q4_0 (its own quantization of the same weights: the dequantized
Q4_1 GGUF requantized, or an F16 GGUF of the random model); llama.cpp Q4_1 (SmolLM2's GGUF as is);
onnxruntime-genai int4 (its model builder's RTN, block 32, defaults otherwise). Each peer runs through its
own API: edgekit's generation loop, llama.cpp's eval + argmax of ``llama_get_logits_ith``, onnxruntime-genai's
Generator (created before the clock starts). The targets (issue 4) compare edgekit with the faster of
llama.cpp Q4_0, llama.cpp Q4_1 (the same format as edgekit's SmolLM2 bundle) and onnxruntime-genai int4, and
only rows of edgekit's precision: against another precision a target is reported as not compared, never as
met or not met. The peers are benchmark-only installs (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers_report import chart, table, targets  # noqa: E402  (the printed table and the targets)

PROMPT_TOKENS, NEW_TOKENS, CONTEXT = 41, 128, 1024
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "r1-1.5b": "R1-Distill-Qwen-1.5B-shaped (random weights)",
          "r1-1.5b-q4km": "R1-Distill-Qwen-1.5B-shaped, Q4_K_M GGUF (llama.cpp's quantize of the F16 GGUF)",
          "r1-7b": "R1-Distill-Qwen-7B Q4_K_M layout (real header, random valid blocks)"}
# Models whose source is one GGUF file that both edgekit (exact blocks) and llama.cpp (as is) run
GGUF_MODELS = ("r1-1.5b-q4km", "r1-7b")
NEW_TOKENS_OF = {"r1-7b": 32}      # ~4 tok/s: 32 tokens per run, as in issue 15's table
PEERS = {"llama.cpp": ("llama_cpp", "pip install llama-cpp-python  (builds from source, ~7 min on 2 cores)"),
         "onnxruntime-genai": ("onnxruntime_genai", "pip install 'onnxruntime-genai==0.18.*' onnx-ir")}
GENAI_BUILDER_GIB = {"smollm2": 2, "r1-1.5b": 15}   # its builder's peak RSS on the 1.5B shape: 12.8-16.7 GiB measured
PROMPT_TEXT = "Explain in a few sentences why the sky is blue."


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ===== workers: each runs in its own process =================================================================
class EdgekitEngine:
    def __init__(self, path, threads, context):
        from edgekit.runtime.model import load

        self.model = load(path, max_context=context, threads=threads)
        self.vocab = self.model.spec.vocab_size

    def generate(self, prompt, n):
        from edgekit.runtime.generate import GenerationRequest, run
        from edgekit.runtime.sampling import SamplingParams

        m = self.model
        req = GenerationRequest(prompt_ids=list(prompt), sampling=SamplingParams(), max_new_tokens=n, ignore_eos=True)
        for event in run(m.decoder, m.codec, req, prefill_chunk=m.prefill_chunk, eos_ids=m.eos_ids):
            if event.kind == "done":
                r = event.result
                return r.ttft_ms, r.decode_tok_s, r.tokens

    def logits(self, ids, start):
        from edgekit.build.evaluate import bundle_logits

        return bundle_logits(self.model.decoder, ids, self.model.manifest.graph.get("logits") == "all", start)


class LlamaEngine:
    def __init__(self, path, threads, context, logits_all=False):
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.vocab = self.llm.n_vocab()
        self._lib = llama_cpp

    def _last(self):
        import numpy as np

        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab,))

    def generate(self, prompt, n):
        import numpy as np

        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(list(prompt))
        tokens = [int(np.argmax(self._last()))]
        t_first = time.perf_counter()
        while len(tokens) < n:
            self.llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(self._last())))
        t_end = time.perf_counter()
        return (t_first - t0) * 1000, (n - 1) / (t_end - t_first), tokens

    def logits(self, ids, start):
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[start:len(ids)], dtype=np.float32)


class GenaiEngine:
    def __init__(self, path, threads, context):
        import onnxruntime_genai as og

        config_file = Path(path) / "genai_config.json"    # threads live in the model's config
        config = json.loads(config_file.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        config_file.write_text(json.dumps(config, indent=4))
        self.og, self.model, self.context = og, og.Model(str(path)), context
        self.vocab = config["model"]["vocab_size"]

    def _generator(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context, min_length=self.context, do_sample=False)
        return self.og.Generator(self.model, params)

    def generate(self, prompt, n):
        gen = self._generator()
        t0 = time.perf_counter()
        gen.append_tokens(list(prompt))
        gen.generate_next_token()
        t_first = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        t_end = time.perf_counter()
        return (t_first - t0) * 1000, (n - 1) / (t_end - t_first), list(gen.get_sequence(0))[len(prompt):]

    def logits(self, ids, start):
        import numpy as np

        gen = self._generator()
        gen.append_tokens(list(ids))
        return np.array(gen.get_output("logits"), dtype=np.float32)[0, start:]   # (S - start, V)


ENGINES = {"edgekit": EdgekitEngine, "llama.cpp": LlamaEngine, "onnxruntime-genai": GenaiEngine}


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_speed(s: dict) -> dict:
    t0 = time.perf_counter()
    engine = ENGINES[s["peer"]](s["path"], s["threads"], s["context"])
    load_s = time.perf_counter() - t0
    engine.generate(s["prompt"][:8], 4)                              # warm-up: first-run allocations
    runs = [engine.generate(s["prompt"], s["new_tokens"]) for _ in range(s["runs"])]
    ttft, tps = [r[0] for r in runs], [r[1] for r in runs]
    return {"load_s": load_s, "ttft_ms": statistics.median(ttft), "ttft_ms_spread": max(ttft) - min(ttft),
            "decode_tok_s": statistics.median(tps), "decode_tok_s_spread": max(tps) - min(tps),
            "generated": len(runs[0][2]), "first_tokens": list(map(int, runs[0][2][:16])),
            "peak_rss_mib": _vm_hwm_mib()}


def worker_fidelity(s: dict) -> dict:
    import numpy as np

    from edgekit.build.evaluate import FidelityStats

    text = json.loads((Path(s["text"]) / "tokens.json").read_text())
    kw = {"logits_all": True} if s["peer"] == "llama.cpp" else {}
    engine = ENGINES[s["peer"]](s["path"], s["threads"], s["context"], **kw)
    stats = FidelityStats()
    for k, (ids, start) in enumerate(zip(text["sequences"], text["starts"])):
        ref = np.load(Path(s["text"]) / f"reference-{k}.npy", mmap_mode="r")   # (S - 1 - start, V)
        out = engine.logits(ids, start)[:len(ids) - 1 - start]
        stats.add(ref, out, ids[start + 1:])
    return stats.summary()


class TransformersReference:
    """transformers' fp32 model of the GGUF, with what ``edgekit.build.evaluate.reference_text`` needs: ``codec``,
    ``context``, ``generate`` (greedy, keeps a final EOS) and ``logits`` (teacher-forced, (S, V))."""

    def __init__(self, gguf: str, context: int, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        from edgekit.build.calibration import codec_from_reader
        from edgekit.sources import open_weights, resolve

        torch.set_num_threads(threads)
        self.torch, path = torch, Path(gguf)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        source = resolve(gguf)
        reader = open_weights(source)
        try:      # the bundle's tokenizer (the peers are fed the same ids)
            self.codec = codec_from_reader(reader)
            eos = reader.special_tokens().get("eos_token_ids") or []
        finally:
            reader.close()
        self.eos_ids = {int(e) for e in eos} | set(source.spec.eos_token_ids)
        self.context = min(int(context), source.spec.max_position_embeddings)

    def logits(self, tokens: list[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([tokens])).logits[0].float().numpy()     # (S, V)

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        new_tokens = min(new_tokens, self.context - len(prompt))
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=sorted(self.eos_ids), pad_token_id=sorted(self.eos_ids)[0])
        return [int(t) for t in out[0, len(prompt):]]


def worker_reference(s: dict) -> dict:
    import numpy as np

    from edgekit.build.evaluate import reference_text

    out = Path(s["out"])
    ref = TransformersReference(s["model"], s["context"], s["threads"])
    sequences, starts = reference_text(ref, s["max_tokens"], ref.context)
    for k, (ids, start) in enumerate(zip(sequences, starts)):
        np.save(out / f"reference-{k}.npy", ref.logits(ids)[start:-1])
    (out / "tokens.json").write_text(json.dumps({"sequences": sequences, "starts": starts,
                                                 "max_tokens": s["max_tokens"], "reference": "transformers fp32"}))
    return {"sequences": len(sequences), "tokens": sum(len(x) - 1 - st for x, st in zip(sequences, starts))}


def worker_build(s: dict) -> dict:
    from edgekit.build import build
    from edgekit.build.target import load_target

    m = build(s["model"], load_target("cpu"), output=Path(s["out"]), precision=s["precision"],
              context=s["context"], force=True).manifest
    return {"memory": m["memory"], "precision": m["precision"]}


def worker_quantize(s: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{s['type']}")
    params.allow_requantize = True          # Q4_1 -> Q4_0 goes through the dequantized float weights
    params.nthread = s["threads"]
    code = llama_cpp.llama_model_quantize(s["src"].encode(), s["dst"].encode(), params)
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code}")
    return {"bytes": Path(s["dst"]).stat().st_size}


def worker_gguf_to_hf(s: dict) -> dict:
    """transformers dequantizes the GGUF to fp32; its GGUF quantizer entry must go before save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(s["src"])
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(s["out"])
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(s["out"])
    return {}


def worker_gguf_f16(s: dict) -> dict:
    sys.path.insert(0, str(HERE))
    from make_r1_shaped import write_gguf

    write_gguf(Path(s["src"]), Path(s["dst"]))
    return {"bytes": Path(s["dst"]).stat().st_size}


WORKERS = {"speed": worker_speed, "fidelity": worker_fidelity, "reference": worker_reference,
           "build": worker_build, "quantize": worker_quantize, "gguf-to-hf": worker_gguf_to_hf,
           "gguf-f16": worker_gguf_f16}


# ===== the parent: preparation, runs, report ==================================================================
def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (including time stolen by the hypervisor), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)     # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


OTHERS = {}   # logfile -> CPU cores other processes used while that child ran


def run_process(cmd: list[str], logfile: Path) -> tuple[int, float, float]:
    """(exit status, peak RSS MiB of the child, seconds); output goes to logfile. Also records in OTHERS how
    many cores the rest of the machine kept busy meanwhile: a measurement next to other work is not valid."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0, busy0 = time.perf_counter(), busy_cpu_seconds()
    with open(logfile, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(logfile.parent))
        _, status, usage = os.wait4(p.pid, 0)     # this child's own rusage: its peak RSS, not the parent's
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    OTHERS[str(logfile)] = max(0.0, busy_cpu_seconds() - busy0 - usage.ru_utime - usage.ru_stime) / wall
    return p.returncode, usage.ru_maxrss / 1024, wall


def worker(kind: str, spec: dict, logfile: Path) -> dict:
    """Run a worker in a fresh interpreter; its result plus "peak_rss_mib"/"seconds", or {"error": ...}."""
    result_file = logfile.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    code, rss, seconds = run_process([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                                      json.dumps(spec), str(result_file)], logfile)
    if code != 0 or not result_file.is_file():
        lines = [x for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
        return {"error": (lines[-1] if lines else f"exit status {code}")[:300], "log": str(logfile)}
    return {**json.loads(result_file.read_text()), "child_peak_rss_mib": rss, "seconds": seconds,
            "other_cores": OTHERS.get(str(logfile), 0.0)}


BUILDS: dict[str, dict] = {}   # what -> seconds and peak RSS of each preparation step, for the record


def _ensure(done: Path, what: str, make) -> dict:
    """Run ``make()`` unless ``done`` (a marker written after success) exists; returns its stored result."""
    if done.is_file():
        BUILDS[what] = json.loads(done.read_text())
        return BUILDS[what]
    log(what)
    result = make()
    if "error" in result:
        raise RuntimeError(f"{what} failed: {result['error']} (log: {result.get('log')})")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    BUILDS[what] = result
    return result


def available(peer: str, skip: set[str]) -> str | None:
    """None when the peer can run, else why not."""
    if peer in skip:
        return "skipped (--skip-peer)"
    module, install = PEERS[peer]
    if importlib.util.find_spec(module) is None:
        return f"not installed: {install}"
    return None


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def prepare(model: str, args, work: Path) -> tuple[list[dict], dict, dict[str, str]]:
    """(rows to measure, the edgekit build's result, why a peer is missing) for one model."""
    from edgekit.sources import packaged_model_path

    d = work / model
    d.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    if model == "smollm2":
        source = str(packaged_model_path("smollm2"))
    elif model == "r1-7b":
        from r1_7b import prepare as prepare_7b

        source = str(args.r1_7b_gguf if args.r1_7b_gguf else prepare_7b(d / "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"))
    elif model == "r1-1.5b-q4km":
        if available("llama.cpp", set()):
            raise RuntimeError("the Q4_K_M file is llama.cpp's own quantization: install llama-cpp-python")
        shared = work / "r1-1.5b"            # the same random model and F16 GGUF as the r1-1.5b rows
        shared.mkdir(parents=True, exist_ok=True)
        hf = shared / "hf"
        _ensure(shared / "hf.done", "writing the R1-shaped random model (about 1 minute)",
                lambda: _make_hf(hf, shared))
        f16 = shared / "f16.gguf"
        _ensure(shared / "f16.gguf.done", "writing the F16 GGUF for llama.cpp",
                lambda: worker("gguf-f16", {"src": str(hf), "dst": str(f16)}, shared / "logs" / "gguf-f16.log"))
        source = str(d / "q4_k_m.gguf")
        _ensure(d / "q4_k_m.gguf.done", "llama.cpp quantize -> Q4_K_M", lambda: worker(
            "quantize", {"src": str(f16), "dst": source, "type": "Q4_K_M", "threads": args.threads},
            d / "logs" / "quantize.log"))
    else:
        hf = d / "hf"
        _ensure(d / "hf.done", "writing the R1-shaped random model (about 1 minute)", lambda: _make_hf(hf, d))
        source = str(hf)
    bundle = d / f"edgekit-{args.precision}"
    built = _ensure(d / f"edgekit-{args.precision}.done", f"edgekit build {model} --precision {args.precision}",
                    lambda: worker("build", {"model": source, "out": str(bundle), "precision": args.precision,
                                             "context": CONTEXT}, d / "logs" / f"build-{args.precision}.log"))
    rows = [{"label": f"edgekit {args.precision}", "peer": "edgekit", "path": str(bundle),
             "precision": args.precision}]

    for peer, prepare_peer in (("llama.cpp", _prepare_llama), ("onnxruntime-genai", _prepare_genai)):
        why = available(peer, args.skip_peer)
        try:
            rows += [] if why else prepare_peer(model, source, args, d)
        except RuntimeError as e:   # a peer that cannot be prepared is reported, the others still run
            why = str(e)
        if why:
            skipped[peer] = why
    return rows, built, skipped


def _make_hf(hf: Path, d: Path) -> dict:
    code, _, sec = run_process([sys.executable, str(HERE / "make_r1_shaped.py"), str(hf)],
                               d / "logs" / "make_r1_shaped.log")
    return {"seconds": sec} if code == 0 else {"error": f"exit status {code}",
                                               "log": str(d / "logs" / "make_r1_shaped.log")}


def _prepare_llama(model: str, source: str, args, d: Path) -> list[dict]:
    """llama.cpp's Q4_0 of the same weights (and, for SmolLM2, its Q4_1 GGUF as is); for a GGUF model, the
    same file edgekit was built from."""
    if model in GGUF_MODELS:
        return [{"label": "llama.cpp (same GGUF)", "peer": "llama.cpp", "path": source, "precision": "int4"}]
    q40 = d / "q4_0.gguf"
    src = source
    if model != "smollm2":
        src = str(d / "f16.gguf")
        _ensure(d / "f16.gguf.done", "writing the F16 GGUF for llama.cpp",
                lambda: worker("gguf-f16", {"src": source, "dst": src}, d / "logs" / "gguf-f16.log"))
    _ensure(d / "q4_0.gguf.done", "llama.cpp quantize -> Q4_0", lambda: worker(
        "quantize", {"src": src, "dst": str(q40), "type": "Q4_0", "threads": args.threads},
        d / "logs" / "quantize.log"))
    rows = [{"label": "llama.cpp Q4_0", "peer": "llama.cpp", "path": str(q40), "precision": "int4"}]
    if model == "smollm2":     # the format edgekit's int4 bundle carries over: the like-for-like kernel comparison
        rows.append({"label": "llama.cpp Q4_1 (GGUF as is)", "peer": "llama.cpp", "path": source,
                     "precision": "int4"})
    return rows


def _prepare_genai(model: str, source: str, args, d: Path) -> list[dict]:
    """onnxruntime-genai's model builder at int4 (RTN) from a Hugging Face folder."""
    if model in GGUF_MODELS:
        raise RuntimeError("not compared on this row: its builder needs a Hugging Face folder (see the r1-1.5b rows)")
    out, hf = d / "genai-int4", d / "hf"
    if model == "smollm2":
        _ensure(d / "hf.done", "GGUF -> Hugging Face folder (transformers) for onnxruntime-genai",
                lambda: worker("gguf-to-hf", {"src": source, "out": str(hf)}, d / "logs" / "gguf-to-hf.log"))
    need, have = GENAI_BUILDER_GIB[model], mem_available_gib()
    if not (d / "genai-int4.done").is_file() and have < need:
        raise RuntimeError(f"not built: its model builder needs about {need} GiB of RAM for this model and "
                           f"{have:.1f} GiB are available")

    def genai_build():
        logfile = d / "logs" / "genai-builder.log"
        code, rss, sec = run_process([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                                      "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(d / "genai-cache")], logfile)
        shutil.rmtree(d / "genai-cache", ignore_errors=True)
        return ({"child_peak_rss_mib": rss, "seconds": sec} if code == 0 else
                {"error": f"builder exit status {code}", "log": str(logfile)})

    _ensure(d / "genai-int4.done", "onnxruntime-genai model builder -> int4", genai_build)
    return [{"label": "onnxruntime-genai int4", "peer": "onnxruntime-genai", "path": str(out), "precision": "int4"}]


def prompt_ids(bundle: Path) -> list[int]:
    """Exactly PROMPT_TOKENS ids: the chat-templated question, cut from the front or padded with text before it."""
    from edgekit.runtime.bundle import read_manifest
    from edgekit.runtime.text import TextCodec

    m = read_manifest(bundle)
    tok = m.tokenizer
    template = m.path(tok["chat_template"]).read_text() if tok.get("chat_template") else None
    codec = TextCodec(m.path(tok["file"]).read_text(encoding="utf-8"), template, tok)
    if codec.has_chat_template:
        ids = codec.encode(codec.render([{"role": "user", "content": PROMPT_TEXT}]), add_special_tokens=False)
    else:
        ids = codec.encode(PROMPT_TEXT, add_special_tokens=True)
    filler = codec.encode("The robot checked the kitchen lights and the door sensors. ", add_special_tokens=False)
    while len(ids) < PROMPT_TOKENS:
        ids = filler[:PROMPT_TOKENS - len(ids)] + ids
    return ids[-PROMPT_TOKENS:]


def bytes_per_token(row: dict, filled: int) -> int | None:
    """What one decode step reads with ``filled`` tokens cached. edgekit: benchmarks/profile_decode.py's count
    (MatMulNBits as onnxruntime repacks them, offsets, the filled float KV rows). llama.cpp: the GGUF's tensor
    bytes (the embedding table only when it is also the output matrix) plus its fp16 KV rows. None otherwise."""
    if row["peer"] == "edgekit":
        from profile_decode import weight_bytes_per_token

        from edgekit.runtime.bundle import read_manifest

        m = read_manifest(row["path"])
        itemsize = {"float32": 4, "float16": 2, "int8": 1}[m.graph.get("kv_dtype", "float32")]
        return sum(weight_bytes_per_token(m.path(m.graph["file"]), m.spec(), filled, itemsize).values())
    if row["peer"] == "llama.cpp":
        from edgekit.sources.gguf_header import read_header

        h = read_header(Path(row["path"]))
        names = {t.name for t in h.tensors}
        tensors = sum(t.n_bytes for t in h.tensors if t.name != "token_embd.weight" or "output.weight" not in names)
        arch = h.value("general.architecture")
        layers, heads = h.value(f"{arch}.block_count"), h.value(f"{arch}.attention.head_count")
        kv_heads = h.value(f"{arch}.attention.head_count_kv") or heads
        head_dim = h.value(f"{arch}.embedding_length") // heads
        return tensors + 2 * layers * kv_heads * head_dim * 2 * filled
    return None


def bench_model(model: str, args, work: Path) -> dict:
    BUILDS.clear()
    rows, built, skipped = prepare(model, args, work)
    builds = {what: {k: r[k] for k in ("seconds", "child_peak_rss_mib") if k in r} for what, r in BUILDS.items()}
    prompt = prompt_ids(Path(rows[0]["path"]))
    runs = 1 if args.quick else 3
    new_tokens = NEW_TOKENS_OF.get(model, NEW_TOKENS)
    for row in rows:
        log(f"{model}: speed of {row['label']} ({runs} run{'s' if runs > 1 else ''})")
        row["speed"] = worker("speed", {"peer": row["peer"], "path": row["path"], "threads": args.threads,
                                        "prompt": prompt, "new_tokens": new_tokens, "runs": runs, "context": CONTEXT},
                              work / model / "logs" / f"speed-{slug(row['label'])}.log")
    for row in rows:        # bytes each decode step reads, halfway through the generation: achieved GB/s
        row["bytes_per_token"] = bytes_per_token(row, len(prompt) + new_tokens // 2)
        s = row.get("speed", {})
        if row["bytes_per_token"] and "decode_tok_s" in s:
            s["gb_s"] = row["bytes_per_token"] * s["decode_tok_s"] / 1e9
            s["of_bandwidth"] = s["gb_s"] / args.bandwidth
    fidelity_note = None
    if model != "smollm2":
        fidelity_note = "fidelity not measured: random weights make it meaningless"
    elif args.no_fidelity:
        fidelity_note = "fidelity not measured (--no-fidelity)"
    else:
        max_tokens = 128 if args.quick else 512
        text = work / model / f"reference-hf-text-{max_tokens}"     # (not the old edgekit-exported reference)
        text.mkdir(parents=True, exist_ok=True)
        from edgekit.sources import packaged_model_path

        _ensure(text / "done", f"transformers' fp32 reference writes and scores {max_tokens} tokens",
                lambda: worker("reference", {"model": str(packaged_model_path("smollm2")), "out": str(text),
                                             "context": CONTEXT, "max_tokens": max_tokens, "threads": args.threads},
                               work / model / "logs" / "reference.log"))
        for row in rows:
            log(f"{model}: fidelity of {row['label']}")
            row["fidelity"] = worker("fidelity", {"peer": row["peer"], "path": row["path"], "threads": args.threads,
                                                  "context": CONTEXT, "text": str(text)},
                                     work / model / "logs" / f"fidelity-{slug(row['label'])}.log")
    mem = built["memory"]
    rss_budget = (mem["weights_bytes"] + mem["kv_bytes_per_token"] * CONTEXT) / 2**20 + 100
    return {"model": MODELS[model], "key": model, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "runs": runs, "context": CONTEXT, "rows": rows, "skipped": skipped, "fidelity_note": fidelity_note,
            "edgekit_build": built, "builds": builds, "rss_budget_mib": rss_budget,
            "targets": targets(rows, rss_budget)}


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":      # internal: one measurement in a fresh process
        kind, spec, result_file = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        result_file.write_text(json.dumps(WORKERS[kind](spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for every peer [default: 2]")
    ap.add_argument("--models", default="smollm2,r1-1.5b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--precision", default="int4", help="edgekit bundle precision: int4, int8, fp16, fp32")
    ap.add_argument("--skip-peer", action="append", default=[], choices=sorted(PEERS), help="repeatable")
    ap.add_argument("--quick", action="store_true", help="1 timed run instead of 3; fidelity on 128 tokens, not 512")
    ap.add_argument("--no-fidelity", action="store_true", help="speed and memory only")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "edgekit-compare",
                    help="where converted models are kept between runs [default: $TMPDIR/edgekit-compare]")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON and PNG [default: WORK/results]")
    ap.add_argument("--bandwidth", type=float, default=34.0,
                    help="GB/s this machine reads with --threads, for the %% of bandwidth column [34: the 2-core "
                         "reference machine, 2 threads]")
    ap.add_argument("--r1-7b-gguf", type=Path, default=None,
                    help="an already prepared 7B layout file (benchmarks/r1_7b.py); default: prepared in WORK")
    args = ap.parse_args()
    args.skip_peer = set(args.skip_peer)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}: use {', '.join(MODELS)}")
    work = args.work.resolve()
    started = time.time()
    results = []
    for model in models:
        res = bench_model(model, args, work)
        results.append(res)
        print(table(res, args.threads) + "\n", flush=True)
    out = (args.out or work / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"threads": args.threads, "precision": args.precision, "quick": args.quick,
              "cpu": os.cpu_count(), "load_average_at_end": os.getloadavg(), "minutes": (time.time() - started) / 60,
              "models": results}
    (out / f"compare_peers-{stamp}.json").write_text(json.dumps(record, indent=1))
    drawn = chart(results, out / f"compare_peers-{stamp}.png")
    print(f"wrote {out / f'compare_peers-{stamp}.json'}" + (" and .png" if drawn else " (no matplotlib: no chart)")
          + f" in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
