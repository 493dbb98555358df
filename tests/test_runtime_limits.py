"""What a hostile or inconsistent bundle cannot make the runtime do (issue 13, items 8-10): allocate more
than the budget by lying about its KV cache, address positions past its rotary tables, read files outside
the bundle through any tensor of its graph; and a thinking budget near a full cache ends with "length"."""

from __future__ import annotations

import json

import pytest

from edgekit.errors import BudgetExceeded, BundleError
from edgekit.runtime.bundle import read_manifest, verify, write_manifest
from edgekit.runtime.model import load
from edgekit.runtime.onnx_refs import read_graph

HELLO = [{"role": "user", "content": "hello robot"}]


def _edit_manifest(bundle, edit) -> None:
    data = read_manifest(bundle).to_dict()
    edit(data)
    write_manifest(bundle, data)


def _fixed_bytes(memory: dict) -> int:
    return memory["weights_bytes"] + memory["workspace_bytes"] + memory["overhead_bytes"]


# ----- item 8: the budget is checked against what the backend allocates -----------------------------------
def test_budget_counts_the_kv_cache_the_graph_needs_not_the_manifests_claim(tiny_bundle, copy_bundle):
    honest = json.loads((tiny_bundle / "manifest.json").read_text())
    context, per_token = honest["max_context"], honest["memory"]["kv_bytes_per_token"]
    assert per_token == 2 * 2 * 2 * 16 * 4       # K and V x 2 layers x 2 kv heads x head_dim 16 x float32
    liar = copy_bundle(tiny_bundle)

    def claim_one_byte(m):
        m["memory"].update(kv_bytes_per_token=1, kv_cache_bytes=context)
        m["memory"]["total_bytes"] = _fixed_bytes(m["memory"]) + context

    _edit_manifest(liar, claim_one_byte)
    budget = _fixed_bytes(honest["memory"]) + context        # enough for the claim, not for the real cache
    with pytest.raises(BudgetExceeded) as e:
        load(liar, memory_budget=budget)
    assert e.value.needed_bytes == honest["memory"]["total_bytes"] and e.value.available_bytes == budget
    m = load(liar, memory_budget=honest["memory"]["total_bytes"])
    assert m.memory.kv_cache_bytes == m.decoder.kv_cache_bytes == per_token * context


def test_weights_are_at_least_the_files_the_graph_reads(tiny_bundle, copy_bundle):
    liar = copy_bundle(tiny_bundle)
    real = json.loads((tiny_bundle / "manifest.json").read_text())["memory"]
    _edit_manifest(liar, lambda m: m["memory"].update(weights_bytes=0))
    # the claim of 0 is replaced by the data file's size (small initializers inside model.onnx aside)
    floor = real["total_bytes"] - real["weights_bytes"] + (tiny_bundle / "model.onnx.data").stat().st_size
    assert floor > real["total_bytes"] - real["weights_bytes"] + real["weights_bytes"] // 2
    with pytest.raises(BudgetExceeded) as e:
        load(liar, memory_budget=floor - 1)
    assert e.value.needed_bytes == floor


def test_a_model_section_that_disagrees_with_the_graph_is_refused(tiny_bundle, copy_bundle):
    liar = copy_bundle(tiny_bundle)
    _edit_manifest(liar, lambda m: m["model"].update(num_kv_heads=1))      # the graph has 2
    with pytest.raises(BundleError, match=r"model.onnx input past_key_0 is type 1 with shape "
                                          r"\['batch', 2, 'kv_capacity', 16\] but the manifest describes 2 layers "
                                          r"of float32 K/V with 1 kv heads x head_dim 16: the manifest does not "
                                          r"match the graph"):
        load(liar)


def test_max_context_past_the_rotary_tables_is_refused_at_load(tiny_bundle, copy_bundle):
    rows = 256                                      # the fixture's graph: rope.cos and rope.sin are (256, 8)
    info = read_graph((tiny_bundle / "model.onnx").read_bytes())
    assert info.rotary_tables == {"rope.cos", "rope.sin"} and info.initializers["rope.cos"] == (rows, 8)
    liar = copy_bundle(tiny_bundle)
    _edit_manifest(liar, lambda m: m.update(max_context=300))
    with pytest.raises(BundleError, match=rf"claims max_context 300 but its graph's rotary tables cover {rows} "
                                          rf"positions: .* or load with max_context <= {rows}"):
        load(liar)
    # what it can address still runs to the end of the table, with no onnxruntime error on the way
    m = load(liar, max_context=rows)
    result = m.generate(prompt="robot", max_new_tokens=rows, temperature=0, ignore_eos=True)
    assert result.finish_reason == "length" and result.prompt_tokens + result.completion_tokens == rows


# ----- item 9: every tensor reference of the graph is checked, in verify and at load ------------------------
def _external(name: str, location: str):
    import onnx

    t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _hide(model, how: str, location: str) -> None:
    """Put a tensor read from ``location`` somewhere other than the top-level initializers."""
    import onnx
    from onnx import helper

    constant = helper.make_node("Constant", [], ["hidden"], value=_external("c", location))
    if how == "constant":
        model.graph.node.append(constant)
    elif how == "sparse":
        sparse = helper.make_sparse_tensor(_external("v", location), helper.make_tensor("i", onnx.TensorProto.INT64,
                                                                                         [4], [0, 1, 2, 3]), [8])
        model.graph.node.append(helper.make_node("Constant", [], ["hidden"], sparse_value=sparse))
    elif how == "tensors attribute":
        node = helper.make_node("Custom", [], ["hidden"], domain="x.hostile")
        node.attribute.append(helper.make_attribute("weights", [_external("a", location)]))
        model.graph.node.append(node)
    elif how == "subgraph":
        inner = helper.make_graph([helper.make_node("Identity", ["hidden"], ["out"])], "inner", [],
                                  [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4])])
        inner.node.insert(0, constant)
        deeper = helper.make_graph([helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=inner)],
                                   "outer", [], [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4])])
        model.graph.node.append(helper.make_node("If", ["cond"], ["x"], then_branch=deeper, else_branch=deeper))
    elif how == "function":
        f = helper.make_function("x.hostile", "F", [], ["hidden"], [constant], [helper.make_opsetid("", 21)])
        model.functions.append(f)
    elif how == "initializer":
        model.graph.initializer.append(_external("i", location))


HOW = ["constant", "sparse", "tensors attribute", "subgraph", "function", "initializer"]


@pytest.mark.parametrize("how", HOW)
def test_every_tensor_reference_is_read_like_onnx_reads_it(tiny_bundle, tmp_path, how):
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    _hide(model, how, "../../secret")
    data = model.SerializeToString()
    ours = set(read_graph(data).locations)
    assert "../../secret" in ours and "model.onnx.data" in ours
    if how not in ("sparse", "function"):      # onnx's own walk covers graphs and attributes, not these two
        reference = {e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"}
        assert ours == reference


@pytest.mark.parametrize("how", HOW)
def test_a_tensor_outside_the_bundle_fails_verify_and_load(tiny_bundle, copy_bundle, how):
    import onnx
    from click.testing import CliRunner

    from edgekit.cli import cli

    bad = copy_bundle(tiny_bundle)
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    _hide(model, how, "../../secret")
    onnx.save(model, str(bad / "model.onnx"))
    _edit_manifest(bad, lambda m: None)                  # re-hashed: the manifest alone cannot tell
    report = verify(bad)
    assert [str(p) for p in report.problems] == [
        "model.onnx: reads its weights from '../../secret', which is not a file of the bundle: the bundle is "
        "corrupt or hostile; do not use it"]
    with pytest.raises(BundleError, match=r"reads its weights from '../../secret', which is not a file"):
        load(bad)
    r = CliRunner().invoke(cli, ["verify", str(bad)])
    assert r.exit_code != 0 and "../../secret" in r.output


def test_a_graph_that_is_not_onnx_fails_verify(tiny_bundle, copy_bundle):
    bad = copy_bundle(tiny_bundle)
    (bad / "model.onnx").write_bytes(b"\x3a\xff\xff\xff\xff\x0f")     # a field claiming 4 GiB of bytes
    _edit_manifest(bad, lambda m: None)
    assert [p.what for p in verify(bad).problems] == ["is not a readable ONNX model (truncated field)"]


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    out, n = bytearray([number << 3 | 2]), len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n]) + payload


def test_subgraphs_nested_past_the_limit_are_refused():
    # written by hand: the protobuf library itself refuses to build messages this deep
    graph = b""
    for _ in range(40):      # GraphProto.node(1) -> NodeProto.attribute(5) -> AttributeProto.g(6) -> GraphProto
        graph = _field(1, _field(5, _field(6, graph)))
    with pytest.raises(ValueError, match="subgraphs nested more than 32 deep"):
        read_graph(_field(7, graph))
    shallow = b""
    for _ in range(10):
        shallow = _field(1, _field(5, _field(6, shallow)))
    assert read_graph(_field(7, shallow)).locations == []


# ----- item 10: the forced </think> takes cache rows ------------------------------------------------------
def test_thinking_budget_close_to_a_full_cache_ends_with_length(tiny_bundle):
    prompt = load(tiny_bundle, max_context=64).count_tokens(messages=HELLO)
    small = load(tiny_bundle, max_context=prompt + 12)
    result = small.generate(messages=HELLO, temperature=0, thinking_budget=3)
    assert result.thinking_budget_hit and result.finish_reason == "length"
    assert "</think>" in result.text and small.decoder.position <= small.max_context
    # the same request without the budget uses every row for the thought
    free = small.generate(messages=HELLO, temperature=0)
    assert free.finish_reason == "length" and free.completion_tokens == 12
