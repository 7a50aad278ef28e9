"""Model adapters: each turns one model family into a :class:`QuantizedModel` with its published recipe.

:func:`qwt_core.quantize` picks one by model type; the builders are importable here too. No adapter
imports its framework at module level, so ``import qwt_core`` stays light.
"""
from .base import QuantizedModel
from .hf import build_hf_from_meta, quantize_hf_model
from .mmdet_swin import quantize_mmdet_swin_detector
from .open_clip import quantize_open_clip_text, quantize_open_clip_visual
from .timm_resnet import quantize_resnet
from .timm_swin import quantize_timm_swin
from .timm_vit import quantize_timm_vit

__all__ = ["QuantizedModel", "build_hf_from_meta", "quantize_hf_model", "quantize_mmdet_swin_detector",
           "quantize_open_clip_text", "quantize_open_clip_visual", "quantize_resnet", "quantize_timm_swin",
           "quantize_timm_vit"]
