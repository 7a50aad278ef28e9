"""yolo_qwt.export: a quantized + QwT yolo11n through qwt_core's ONNX QDQ path, run in onnxruntime
(one export, about half a minute on a CPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("ultralytics")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from qwt_core.modules import QuantConv2d  # noqa: E402
from yolo_qwt.export import export_yolo  # noqa: E402
from yolo_qwt.models import load_detector  # noqa: E402
from yolo_qwt.quant import YoloQuantConfig, calibrate_yolo, compensate_yolo, quantize_yolo  # noqa: E402


def test_onnx_export_agrees_with_fake_quant(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    det = load_detector("yolo11n.yaml", nc=4)
    images = torch.rand(16, 3, 64, 64)
    qy = quantize_yolo(det, YoloQuantConfig(4, 8))
    calibrate_yolo(qy, images[:8])
    rep = compensate_yolo(qy, list(images.split(8)), progress=False, gate="insample")
    assert rep.applied()
    path = tmp_path / "yolo11n_w4a8.onnx"
    r = export_yolo(det.model, images[:1], str(path), images[:4], threads=1)
    assert path.is_file()
    assert r["integer_layers"] + r["float_layers"] == 62 == sum(isinstance(m, QuantConv2d) for m in det.model.modules())
    assert r["ort_ops"]["all_ops"].get("QuantizeLinear", 0) > 0        # a QDQ graph, not a float copy
    assert r["max_rel_diff"] < 1e-4 and r["score_max_abs_diff"] < 1e-4
