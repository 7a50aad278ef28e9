"""ONNX QDQ export of a quantized (+ QwT) YOLO through ``qwt_core.export``, checked in onnxruntime.

The exported graph is the detector's eval output, ``(B, 4 + nc, A)`` decoded boxes and class scores
(NMS stays outside the graph, as in Ultralytics' own ONNX export). ``qwt_core.export`` decides per
quantized conv whether it becomes an integer ``QLinearConv`` (or stays a float conv between QDQ
pairs, with the reason); QwT compensations stay fp32 convs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qwt_core.export import export_onnx


class ExportView(nn.Module):
    """``x (B, 3, H, W)`` → the detector's decoded output ``(B, 4 + nc, A)`` only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def export_yolo(model: nn.Module, example: torch.Tensor, path: str, check_images: torch.Tensor,
                threads: int = 2) -> dict[str, Any]:
    """Export ``model`` (calibrated fake-quant ``DetectionModel``, optionally compensated) to ``path``
    and compare onnxruntime with the fake-quant model on ``check_images`` ``(N, 3, H, W)``.

    Returns ``{"export": report dict, "integer_layers", "float_layers", "ort_ops", "max_abs_diff",
    "max_rel_diff", "score_max_abs_diff"}`` (differences over the decoded output; scores are rows
    4 and up).
    """
    import onnxruntime as ort
    model.eval()
    head = model.model[-1]
    saved = (getattr(head, "export", False), getattr(head, "format", None))
    head.export, head.format = True, "onnx"
    try:
        view = ExportView(model).eval()
        report = export_onnx(view, example, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        with torch.no_grad():
            ref = view(check_images).double()
        got = torch.from_numpy(np.asarray(sess.run(None, {name: check_images.numpy().astype(np.float32)})[0])).double()
    finally:
        head.export, head.format = saved
    diff = (got - ref).abs()
    n_int = sum(bool(p.integer) for p in report.layers)
    return {"export": report.to_dict(), "integer_layers": n_int, "float_layers": len(report.layers) - n_int,
            "ort_ops": (report.ort or {}),
            "max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / ref.abs().max().clamp_min(1e-12)),
            "score_max_abs_diff": float(diff[:, 4:].max())}
