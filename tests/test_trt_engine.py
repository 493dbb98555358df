"""`edgekit engine` and the TensorRT backend against TensorRT 10.3's rules, through the stand-in (tests/gpu/standin.py).

The stand-in applies the parser rules (edgekit.export.trt_check), raises where the real Python bindings raise
(set_optimization_profile_async), refuses unaligned tensor addresses and streams engines through IStreamReader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import standin

from edgekit.build import QuantOptions, build
from edgekit.build.target import load_target
from edgekit.cli import cli
from edgekit.engine import builder as eb
from edgekit.errors import GpuStepFailed
from edgekit.gpu import probe as gp
from edgekit.runtime import trt_compat
from edgekit.runtime.bundle import read_manifest, write_manifest
from edgekit.runtime.model import Model
from edgekit.runtime.trt_backend import TrtDecoder, open_engine_decoder

CONTEXT = 64


@pytest.fixture(scope="module")
def int4_bundle(tiny_qwen2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt-int4") / "tiny-int4"
    build(tiny_qwen2_dir, load_target("orin-nano"), output=folder, precision="int4", context=CONTEXT,
          quant=QuantOptions(method="rtn"))
    return folder


def _negate_one_scale(bundle: Path) -> None:
    """Set one DequantizeLinear scale negative in the weights file, and fix the manifest's hashes up."""
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    scale = next(t for t in model.graph.initializer if t.name == "layers.1.down.scales")
    meta = {e.key: e.value for e in scale.external_data}
    if meta:                                        # in the weights file
        offset = int(meta.get("offset", 0))
        with open(bundle / meta["location"], "r+b") as f:
            f.seek(offset)
            value = np.frombuffer(f.read(2), np.float16)
            f.seek(offset)
            f.write((-np.abs(value)).tobytes())
    else:                                           # small: inside model.onnx
        values = numpy_helper.to_array(scale).copy()
        values.flat[0] = -abs(values.flat[0])
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))
        onnx.save(model, str(bundle / "model.onnx"))
    data = read_manifest(bundle).to_dict()
    data.pop("files")
    write_manifest(bundle, data)


def test_engine_dry_run_checks_the_graph(int4_bundle, copy_bundle):
    ok = CliRunner().invoke(cli, ["engine", str(int4_bundle), "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "graph        passes TensorRT 10.3's parser rules (edgekit's checker; quantized weights: 8 INT4, " \
           "2 INT8)" in ok.output
    bad = copy_bundle(int4_bundle)
    _negate_one_scale(bad)
    for args in (["--dry-run"], []):
        result = CliRunner().invoke(cli, ["engine", str(bad), *args])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("error: model.onnx would not build with TensorRT 10.3: node "
                                   "layers.1.down/Dequantize (DequantizeLinear): scale layers.1.down.scales has 1 of ")
        assert "TensorRT requires every DequantizeLinear scale > 0 (onnxOpImporters.cpp QuantDequantLinearHelper" in \
            lines[0] and lines[0].endswith("rebuild the bundle with this edgekit (edgekit build MODEL --target "
                                           "orin-nano-8gb)")


def test_standin_parser_refuses_what_the_rules_refuse(int4_bundle, copy_bundle, tmp_path):
    bad = copy_bundle(int4_bundle)
    _negate_one_scale(bad)
    trt = standin.make_trt()
    network = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network(1 << 1)
    parser = trt.OnnxParser(network, None)
    assert not parser.parse_from_file(str(bad / "model.onnx"))
    assert parser.num_errors == 1 and "Scale coefficients must all be positive" in parser.get_error(0)
    # the library path checks before TensorRT is called at all
    trt = standin.make_trt()
    with pytest.raises(Exception, match="scale > 0"):
        eb.build_bundle_engine(bad, trt=trt, probe=standin.gpu_probe())
    assert "parse_from_file" not in standin.call_names(trt)


@pytest.fixture(scope="module")
def built(int4_bundle, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("trt-int4-engine") / "b"
    shutil.copytree(int4_bundle, folder)
    eb.build_bundle_engine(folder, trt=standin.make_trt(), probe=standin.gpu_probe())
    return folder


def test_int4_engine_streams_and_matches_onnxruntime(built):
    """The INT4 bundle's engine, deserialized through IStreamReader, against onnxruntime on the same graph."""
    from edgekit.runtime.ort_backend import OrtDecoder

    m = read_manifest(built)
    cuda = standin.FakeCuda()
    trt = standin.make_trt(cuda=cuda)
    ours = open_engine_decoder(m, capacity=CONTEXT, probe=standin.gpu_probe(), trt=trt, cuda=cuda)
    assert ("deserialize_cuda_engine", ("stream",)) in trt.calls and "IStreamReader.__init__" in standin.call_names(trt)
    ref = OrtDecoder(str(built / "model.onnx"), dialect="tensorrt", spec=m.spec(), capacity=CONTEXT,
                     kv_dtype="float16")
    a, b = ours.step(np.arange(11)), ref.step(np.arange(11))
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    for token in (5, 9):
        a, b = ours.step(np.array([token])), ref.step(np.array([token]))
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    ours.close()


def test_refused_profile_and_unaligned_address(built):
    m = read_manifest(built)
    cuda = standin.FakeCuda()
    trt = standin.make_trt(cuda=cuda)
    dec = TrtDecoder(m.path("model.engine"), spec=m.spec(), capacity=CONTEXT, kv_dtype="float16", max_seq=8,
                     profiles={"prefill": 0, "decode": 1}, trt=trt, cuda=cuda, unified_memory=True)
    dec.step(np.arange(3))
    dec.profiles["decode"] = 7                         # an index the engine does not have
    with pytest.raises(GpuStepFailed, match="refused optimization profile 7 .Error in set optimization profile") as e:
        dec.step(np.array([4]))                        # the bindings raise RuntimeError; we say it in one line
    assert e.value.exit_code == 1
    assert not dec.context.set_tensor_address("logits", dec._logits_dev + 128)      # 256-byte alignment
    assert dec.context.set_tensor_address("logits", dec._logits_dev)
    dec.close()


def test_model_close_frees_the_gpu_buffers(built):
    m = read_manifest(built)
    cuda = standin.FakeCuda()
    dec = open_engine_decoder(m, capacity=CONTEXT, probe=standin.gpu_probe(), trt=standin.make_trt(cuda=cuda),
                              cuda=cuda)
    model = Model(m, dec, codec=None, max_context=CONTEXT, memory_need=None)
    assert len(cuda.allocs) >= 2 * m.spec().num_layers + 2
    model.close()
    assert cuda.allocs == {} and ("destroy_stream", 0x5EED) in cuda.calls and model.decoder is None


def test_failed_tensorrt_build_exits_1(int4_bundle, copy_bundle, monkeypatch):
    monkeypatch.setattr(gp, "probe_driver", lambda load=None: standin.gpu_probe())
    monkeypatch.setattr(trt_compat, "import_tensorrt", lambda probe: standin.make_trt(build_ok=False))
    result = CliRunner().invoke(cli, ["engine", str(copy_bundle(int4_bundle))])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: TensorRT 10.3.0 could not build the engine")


def test_quantized_scales_in_the_bundle_are_positive(int4_bundle):
    model = onnx.load(str(int4_bundle / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            assert (numpy_helper.to_array(inits[node.input[1]]) > 0).all(), node.name
