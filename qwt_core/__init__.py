"""qwt_core: RepQ-ViT post-training quantization and QwT closed-form compensation.

::

    import qwt_core as qc

    qm = qc.quantize(model, qc.QuantConfig(w_bits=4, a_bits=4))   # adapter chosen by model type
    qc.calibrate(qm, images[:32])                                   # RepQ-ViT (Percentile for CNNs)
    report = qc.compensate(qm, batches)                             # QwT (512 images in the papers)
    qc.save_quantized(qm.model, "model_w4a4_qwt.pt", qm.meta)
    qc.export_onnx(qm.model, images[:1], "model.onnx")              # int8 ONNX QDQ for onnxruntime

A model without an adapter: :func:`quantize_layers` with a :class:`LayerBits` rule, then a
:class:`QuantizedModel` naming its blocks (``docs/your_model.md``). Everything else is imported from
its module (``qwt_core.modules``, ``qwt_core.quantizers``, ``qwt_core.adapters``, ...).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from .adapters.base import QuantizedModel
from .api import calibrate, compensate, list_adapters, quantize, register_adapter
from .calibrate import CalibrationReport
from .config import ExportConfig, QuantConfig, QwTConfig
from .model_io import load_quantized, save_quantized
from .modules import quant_disabled
from .quantize import LayerBits, quantize_layers
from .qwt import BlockInput, BlockReport, QwTReport

__all__ = [
    "quantize", "calibrate", "compensate", "export_onnx", "save_quantized", "load_quantized",
    "QuantConfig", "QwTConfig", "ExportConfig", "QuantizedModel", "BlockInput",
    "QwTReport", "BlockReport", "CalibrationReport", "register_adapter", "list_adapters",
    "quantize_layers", "LayerBits", "quant_disabled",
]

#: Names that were exported here before; still importable (with a DeprecationWarning) from here,
#: and without one from their module.
_MOVED = {
    "quantize_timm_vit": "adapters", "quantize_timm_swin": "adapters", "quantize_resnet": "adapters",
    "quantize_open_clip_visual": "adapters", "quantize_open_clip_text": "adapters",
    "quantize_mmdet_swin_detector": "adapters", "quantize_hf_model": "adapters",
    "build_hf_from_meta": "adapters", "calibrate_hf": "adapters.hf",
    "calibrate_repq": "pipeline", "apply_qwt": "qwt", "repq_calibrate": "repq",
    "CompensatedBlock": "compensation", "GroupedConvLeastSquares": "compensation",
    "TokenLeastSquares": "compensation", "QuantConv2d": "modules", "QuantLinear": "modules",
    "QuantMatMul": "modules", "set_quant_state": "modules", "LogSqrt2Quantizer": "quantizers",
    "PercentileQuantizer": "quantizers", "UniformQuantizer": "quantizers",
    "exact_quantile": "quantizers", "validate_bits": "quantizers",
    "reparameterize_layernorm": "reparam", "calibration_mask": "calibrate", "find_ln_pairs": "calibrate",
}


def export_onnx(model: Any, example_input: Any, path: str, config: Any = None, calib_images: Any = None) -> Any:
    """Export a calibrated (+ QwT) fake-quant model as an int8 ONNX QDQ graph; see
    :func:`qwt_core.export.export_onnx` (imported on first use: it needs ``onnx``)."""
    from .export import export_onnx as _export

    return _export(model, example_input, path, config, calib_images=calib_images)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        where = f"{__name__}.{_MOVED[name]}"
        warnings.warn(f"qwt_core.{name} moved: import it from {where}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'qwt_core' has no attribute {name!r}")
