"""qwt_core: RepQ-ViT post-training quantization and QwT closed-form compensation.

Typical use on any model::

    qm = quantize_timm_vit(model, w_bits=4, a_bits=4)       # or your own QuantizedModel
    calibrate_repq(qm, calib_images[:32])                    # RepQ-ViT
    report = compensate(qm, calib_batches)                   # QwT, 512 images in the paper

For models without an adapter, call :func:`apply_qwt` with the block names and a function that
produces the first block's input.
"""
from .adapters.base import QuantizedModel
from .adapters.hf import build_hf_from_meta, calibrate_hf, quantize_hf_model
from .adapters.mmdet_swin import quantize_mmdet_swin_detector
from .adapters.open_clip import quantize_open_clip_text, quantize_open_clip_visual
from .adapters.timm_resnet import quantize_resnet
from .adapters.timm_swin import quantize_timm_swin
from .adapters.timm_vit import quantize_timm_vit
from .calibrate import CalibrationReport, calibrate, calibration_mask, find_ln_pairs
from .compensation import CompensatedBlock, GroupedConvLeastSquares, TokenLeastSquares
from .model_io import load_quantized, save_quantized
from .modules import QuantConv2d, QuantLinear, QuantMatMul, quant_disabled, set_quant_state
from .pipeline import calibrate_repq, compensate
from .quantize import LayerBits, quantize_layers
from .quantizers import (LogSqrt2Quantizer, PercentileQuantizer, UniformQuantizer, exact_quantile,
                         validate_bits)
from .qwt import BlockInput, BlockReport, QwTReport, apply_qwt
from .reparam import reparameterize_layernorm
from .repq import repq_calibrate

__all__ = [
    "QuantizedModel", "quantize_mmdet_swin_detector", "quantize_open_clip_text",
    "quantize_open_clip_visual", "quantize_resnet", "quantize_timm_swin", "quantize_timm_vit",
    "CompensatedBlock", "GroupedConvLeastSquares", "TokenLeastSquares", "load_quantized",
    "save_quantized", "QuantConv2d", "QuantLinear", "QuantMatMul", "quant_disabled",
    "set_quant_state", "calibrate_repq", "compensate", "LayerBits", "quantize_layers",
    "LogSqrt2Quantizer", "PercentileQuantizer", "UniformQuantizer", "exact_quantile",
    "validate_bits", "QwTReport", "apply_qwt", "reparameterize_layernorm", "repq_calibrate",
    "BlockInput", "BlockReport",
    "quantize_hf_model", "build_hf_from_meta", "calibrate_hf", "CalibrationReport", "calibrate",
    "calibration_mask", "find_ln_pairs",
]
