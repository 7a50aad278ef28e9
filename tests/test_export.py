"""ONNX QDQ export (qwt_core.export): integer kernels in onnxruntime, agreement with the fake-quant
model, exact integer grids, clear errors with nothing written, CLI and module entry."""
import copy
import json
import os

import numpy as np
import pytest
import timm
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import qwt_core  # noqa: E402
from qwt_core import export as qx  # noqa: E402
from qwt_core.quantizers import UniformQuantizer, uniform_fake_quant  # noqa: E402

from cls_helpers import base_argv, make_image_folder  # noqa: E402
from helpers_models import images  # noqa: E402


def _tiny_vit() -> nn.Module:
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


def _calibrated_vit(w_bits=8, a_bits=8, integer_zero_point=True):
    torch.manual_seed(0)
    qm = qwt_core.adapters.quantize_timm_vit(_tiny_vit(), w_bits, a_bits)
    qwt_core.calibrate(qm, images(16, 32), integer_zero_point=integer_zero_point)
    return qm


def _n_comp(model):
    return sum(isinstance(m, qwt_core.compensation.CompensatedBlock) for m in model.modules())


def _int_weight(path, layer):
    """``(stored ints, scale, zero point)`` read through the DequantizeLinear of ``layer``'s weight
    (the exporter may share identical zero-point initializers between layers)."""
    m = onnx.load(path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == layer + ".qwt_wint")
    return inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]


@pytest.fixture(scope="module")
def calibrated_vit():
    """Tiny ViT W8A8 RepQ-ViT (integer zero points); tests take deep copies."""
    return _calibrated_vit()


@pytest.fixture(scope="module")
def vit_int8(tmp_path_factory, calibrated_vit):
    """Tiny ViT W8A8 RepQ-ViT + QwT, exported with an int8 compensation."""
    qm = copy.deepcopy(calibrated_vit)
    rep_q = qwt_core.compensate(qm, [images(16, 32, seed=s) for s in (1, 2)], progress=False,
                                gate="insample")
    assert sum(b.applied for b in rep_q.blocks) >= 1
    path = str(tmp_path_factory.mktemp("onnx") / "vit.onnx")
    report = qx.export_onnx(qm.model, images(2, 32), path, compensation="int8", calib_images=images(16, 32))
    return qm, report, path


def test_vit_quantized_linears_run_integer_kernels(vit_int8):
    _, report, _ = vit_int8
    ort_info = report.ort
    assert ort_info["quantized_in_float"] == [], ort_info["quantized_in_float"]  # no DQ→fp32 Gemm left
    linears = [p for p in report.layers if p.kind == "linear"]
    assert len(linears) == 2 * 4 + 1 + _n_comp(report.reference)  # 4 per block, head, compensations
    for p in linears:
        assert p.integer and p.ort_op in qx.INTEGER_OPS, (p.name, p.ort_op, p.reason)
    assert any(".compensation" in p.name for p in linears)
    # q·kᵀ is an integer matmul too; attn·v (log-√2) stays float
    mm = {p.name.rsplit(".", 1)[-1]: p for p in report.layers if p.kind == "matmul"}
    assert mm["matmul1"].integer and not mm["matmul2"].integer and "log-√2" in mm["matmul2"].reason
    n_int = sum(ort_info["integer_ops"].values())
    assert n_int >= len(linears) + 2, ort_info
    # float compute left: the 2 attn·v products and the W8 patch-embedding conv (reported as such)
    fops = ort_info["float_ops"]
    assert fops.get("MatMul", 0) + fops.get("FusedMatMul", 0) == 2 and fops.get("Gemm", 0) == 0, ort_info
    conv = next(p for p in report.layers if p.kind == "conv")
    assert not conv.integer and "zero point" in conv.reason


def test_vit_weights_are_exact_integer_grid(vit_int8):
    qm, report, path = vit_int8
    ref = report.reference
    checked = 0
    for p in report.layers:
        if p.kind != "linear":
            continue
        layer = ref.get_submodule(p.name)
        stored, s, z = _int_weight(path, p.name)
        assert str(stored.dtype) == p.weight_dtype and str(z.dtype) == p.weight_dtype
        q = stored.astype(np.int64) - z.astype(np.int64)[None, :]
        w_onnx = (q.astype(np.float32) * s[None, :]).T
        w_fq = layer.weight_quantizer(layer.weight.detach()).numpy()
        np.testing.assert_array_equal(w_onnx, w_fq)
        if p.weight_dtype == "int8" and report.weight_dtype_effective == "portable":
            assert np.abs(stored).max() <= qx.SAFE_INT8
        checked += 1
    assert checked == 9 + _n_comp(ref)


def test_vit_agreement_with_fake_quant(vit_int8):
    qm, report, path = vit_int8
    export_model, _ = qx.build_export_module(report.reference)
    x = images(64, 32, seed=7)
    with torch.no_grad():  # the traced module computes the fake-quant function (the attention's
        ex, ref = export_model(x), report.reference(x)  # log-√2 runs from log_softmax: float noise)
    assert torch.equal(ex.argmax(1), ref.argmax(1))
    assert float((ex - ref).abs().max() / ref.abs().max()) < 1e-3
    res = qx.compare_onnx(path, report.reference, x)
    assert res["count"] == 64
    assert res["identical"] >= 0.99, res
    assert res["max_rel_logit_diff"] < 0.05, res
    # the int8 compensation is a real change against the fp32-compensated model, but a small one
    with torch.no_grad():
        diff = (report.reference(x) - qm.model(x)).abs().max()
    assert 0 < diff < 0.5 * qm.model(x).abs().max()


@pytest.fixture(scope="module")
def resnet_w4(tmp_path_factory):
    """timm ResNet-18 W4 (inputs at 8 bits, BatchNorm kept as in the published recipe) + QwT."""
    from timm.models.resnet import BasicBlock, ResNet
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()  # a real timm ResNet, 1 block/stage
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BatchNorm statistics (timm zero-inits the last BN)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_mean = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_var = 0.5 + torch.rand(m.num_features, generator=g)
    qm = qwt_core.adapters.quantize_resnet(model, 4, 4, act_mode="reference8")
    qwt_core.calibrate(qm, images(8, 32))
    qwt_core.compensate(qm, [images(16, 32, seed=1)], progress=False)
    path = str(tmp_path_factory.mktemp("onnx") / "resnet.onnx")
    return qm, qx.export_onnx(qm.model, images(2, 32), path), path


def test_resnet_convs_fuse_into_qlinearconv(resnet_w4):
    qm, report, path = resnet_w4
    assert report.ort["quantized_in_float"] == []
    convs = {p.name: p for p in report.layers if p.kind == "conv"}
    # conv1 of every BasicBlock is followed by BatchNorm → ReLU → the next input quantizer: folded
    # into QLinearConv; conv2 / downsample feed the residual sum; the stem conv has W8 weights
    integer = [n for n, p in convs.items() if p.integer]
    assert sorted(integer) == sorted(n for n in convs if n.endswith(".conv1") and n != "conv1"), integer
    assert all(convs[n].ort_op == "QLinearConv" for n in integer)
    assert report.ort["integer_ops"].get("QLinearConv") == len(integer)
    assert "not requantized" in convs["layer1.0.conv2"].reason
    assert "zero point" in convs["conv1"].reason
    # the BatchNorm after each integer conv is folded into its int8 weight scale and int32 bias
    graph = onnx.load(path).graph
    n_bn = sum(n.op_type == "BatchNormalization" for n in graph.node)
    assert 0 < n_bn <= sum(isinstance(m, nn.BatchNorm2d) for m in qm.model.modules()) - len(integer)
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "Conv" and n.input[1].endswith(".qwt_wint"):
            raise AssertionError(f"{n.input[1]} read without DequantizeLinear")
        if n.op_type == "BatchNormalization":
            conv = producer.get(n.input[0])
            assert conv is None or conv.op_type != "Conv" or not producer.get(conv.input[1]) \
                or producer[conv.input[1]].op_type != "DequantizeLinear"


def test_resnet_agreement_and_int8_compensation_refused(resnet_w4, tmp_path):
    qm, report, path = resnet_w4
    res = qx.compare_onnx(path, qm.model, images(64, 32, seed=3))
    assert res["identical"] >= 0.97, res
    assert np.isfinite(res["max_rel_logit_diff"])
    out = tmp_path / "r.onnx"
    with pytest.raises(qx.ExportError, match="compensation='fp32'"):
        qx.export_onnx(qm.model, images(2, 32), str(out), compensation="int8", calib_images=images(4, 32))
    assert not out.exists()


# ------------------------------------------------------------------------------------ bad input
def _no_files_written(directory):
    return [f for f in os.listdir(directory)] == []


def test_uncalibrated_model_refused(tmp_path):
    qm = qwt_core.adapters.quantize_timm_vit(_tiny_vit(), 8, 8)
    path = tmp_path / "m.onnx"
    with pytest.raises(qx.ExportError) as exc:
        qx.export_onnx(qm.model, images(2, 32), str(path))
    msg = str(exc.value)
    assert "not calibrated" in msg and "qwt_core.calibrate" in msg and "\n" not in msg
    assert msg.split(":")[0] in dict(qm.model.named_modules())  # names the layer
    assert _no_files_written(tmp_path)


def test_fractional_zero_point_needs_flag_and_existing_file_survives(tmp_path):
    qm = _calibrated_vit(integer_zero_point=False)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")
    with pytest.raises(qx.ExportError) as exc:
        qx.export_onnx(qm.model, images(2, 32), str(path))
    msg = str(exc.value)
    assert "fractional" in msg and "--integer_zero_point" in msg and "--round_zero_points" in msg
    reparameterized = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")}
    assert msg.split(":")[0] in reparameterized  # names the layer
    assert path.read_bytes() == b"previous model" and os.listdir(tmp_path) == ["m.onnx"]
    # with the flag, every reparameterized input gets a rounded zero point, and says so
    export_model, plans = qx.build_export_module(qm.model, round_zero_points=True)
    rounded = {p.name for p in plans if p.zero_point_rounded}
    assert msg.split(":")[0] in rounded and rounded <= reparameterized
    x = images(8, 32)
    with torch.no_grad():
        assert not torch.equal(export_model(x), qm.model(x))  # a real (measured) change


def test_unsupported_layer_and_bad_options(tmp_path, calibrated_vit):
    class MyQuantLinear(qwt_core.modules.QuantLinear):
        pass

    qm = copy.deepcopy(calibrated_vit)
    head = qm.model.head
    mine = MyQuantLinear(head.in_features, head.out_features)
    mine.load_state_dict(head.state_dict())
    qm.model.head = mine
    with pytest.raises(qx.ExportError, match=r"^head: unsupported quantized layer MyQuantLinear"):
        qx.export_onnx(qm.model, images(2, 32), str(tmp_path / "m.onnx"))
    with pytest.raises(qx.ExportError, match="weight_dtype"):
        qx.build_export_module(calibrated_vit.model, weight_dtype="int4")
    with pytest.raises(qx.ExportError, match="no QwT compensation"):
        qx.export_onnx(calibrated_vit.model, images(2, 32), str(tmp_path / "m.onnx"),
                       compensation="int8", calib_images=images(4, 32))
    assert _no_files_written(tmp_path)


# ------------------------------------------------------------------------------------ the grids
@pytest.mark.parametrize("bits,lo,hi", [(8, -1.0, 3.0), (4, -1.0, 3.0), (4, 0.5, 3.0), (6, -3.0, -0.2)])
def test_act_qdq_matches_fake_quant_below_8_bits(bits, lo, hi):
    q = UniformQuantizer(bits)
    q.initialize(torch.empty(10000).uniform_(lo, hi))
    spec = qx.act_spec("x", q, round_zero_points=False)
    assert spec.qmax - spec.qmin == 2 ** bits - 1 and 0 <= spec.qmin and spec.qmax <= 255
    x = torch.randn(20000) * 4
    ours = torch.ops.qwt_export.act_qdq(x, spec.scale, spec.zero_point, spec.qmin, spec.qmax)
    assert torch.equal(ours, uniform_fake_quant(x, q.delta, q.zero_point, bits))


def test_act_grid_outside_uint8_refused():
    q = UniformQuantizer(8)
    q.initialize(torch.empty(1000).uniform_(2.0, 3.0))  # all positive: z < 0
    with pytest.raises(qx.ExportError, match="does not fit uint8"):
        qx.act_spec("blk.fc", q, round_zero_points=False)


def test_weight_storage_choices():
    w = torch.randn(16, 40)
    for bits, dtype in ((8, torch.uint8), (6, torch.int8), (4, torch.int8)):
        q = UniformQuantizer(bits, channel_wise=True, channel_dim=0)
        q.initialize(w)
        ints, scale = qx.weight_ints("l", w, q)
        assert torch.equal(ints.float() * scale[:, None], q(w))
        got, zp = qx.linear_weight_storage(ints, "auto")
        assert got == dtype
        stored = ints + zp[:, None]
        lim = (-qx.SAFE_INT8, qx.SAFE_INT8) if dtype == torch.int8 else (0, 255)
        assert int(stored.min()) >= lim[0] and int(stored.max()) <= lim[1]
        assert (qx.conv_weight_storage(ints, "auto") is None) == (bits == 8)
    assert qx.linear_weight_storage(ints, "int8")[0] == torch.int8


def _tiny_graph(path, bias: bool):
    """x → Q/DQ → MatMul/Gemm ← DQ(int8 weight): the fusable pattern, or the naive one (fp32 bias
    after the MatMul of a 2-D input, which onnxruntime turns into an fp32 Gemm first)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(128, np.uint8), "zx"),
             numpy_helper.from_array(rng.integers(-60, 60, (32, 16)).astype(np.int8), "w.qwt_wint"),
             numpy_helper.from_array(np.full(16, 0.01, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(16, np.int8), "zw"),
             numpy_helper.from_array(np.ones(16, np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w.qwt_wint", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm" if bias else "y"])]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)


def test_integer_op_report_catches_a_naive_fp32_gemm(tmp_path):
    good, naive = str(tmp_path / "good.onnx"), str(tmp_path / "naive.onnx")
    _tiny_graph(good, bias=False)
    _tiny_graph(naive, bias=True)
    rep = qx.integer_op_report(good)
    assert rep["quantized_in_float"] == [] and rep["integer_ops"], rep
    rep = qx.integer_op_report(naive)
    assert rep["quantized_in_float"] == ["Gemm:w.qwt_wint"], rep
    assert not rep["integer_ops"]


# ------------------------------------------------------------------------------------ CLI + entry
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from cls_repq_vit import cli
    root = tmp_path_factory.mktemp("cli")
    data_dir = make_image_folder(str(root / "data"))
    out_json, onnx_path, saved = str(root / "r.json"), str(root / "m.onnx"), str(root / "q.pt")
    argv = base_argv("deit_small", data_dir, out_json) + [
        "--w_bit", "8", "--a_bit", "8", "--integer_zero_point", "--export_onnx", onnx_path, "--eval_onnx",
        "--save_quantized", saved]
    cli.main(argv)
    with open(out_json) as f:
        return json.load(f), data_dir, onnx_path, saved


def test_cli_export_and_eval_onnx(cli_run):
    res, _, onnx_path, _ = cli_run
    assert os.path.isfile(onnx_path)
    onnx_res = res["onnx"]
    assert onnx_res["ort"]["quantized_in_float"] == []
    assert onnx_res["integer_layers"] >= 9 and onnx_res["compensation"] == "fp32"
    ev = onnx_res["eval"]
    assert ev["count"] == 21 and ev["identical"] >= 0.99
    assert abs(ev["top1_onnx"] - ev["top1_reference"]) <= 100 / 21 + 1e-9
    assert abs(ev["top1_reference"] - res["accuracy"]["qwt"]["top1"]) < 1e-9  # same model
    assert "max_rel_logit_diff" in ev


def test_cli_onnx_flags_need_export(tmp_path, capsys):
    from cls_repq_vit import cli
    data_dir = make_image_folder(str(tmp_path / "d"))
    with pytest.raises(SystemExit) as exc:
        cli.main(base_argv("deit_small", data_dir, os.devnull) + ["--eval_onnx"])
    assert "--export_onnx" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        cli.main(base_argv("deit_small", data_dir, os.devnull) + ["--export_onnx", str(tmp_path / "x.onnx"),
                                                                  "--onnx_compensation", "int8", "--skip_qwt"])
    assert "--skip_qwt" in str(exc.value.code)


def test_module_entry_exports_saved_model(cli_run, tmp_path):
    from cls_repq_vit import export_onnx as export_cli
    _, data_dir, _, saved = cli_run
    out = str(tmp_path / "saved.onnx")
    assert export_cli.main([saved, out, "--data_dir", data_dir, "--eval"]) == 0
    with open(str(tmp_path / "saved.json")) as f:
        rep = json.load(f)
    assert rep["export"]["ort"]["quantized_in_float"] == []
    assert rep["eval"]["count"] == 21 and rep["eval"]["identical"] >= 0.99
    with pytest.raises(SystemExit, match="not found"):
        export_cli.main([str(tmp_path / "missing.pt"), out])
