"""Percentile-baseline adapter for timm / torchvision-style ResNets (QwT grouped-conv form)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..modules import QuantConv2d, QuantLinear
from ..quantizers import PercentileQuantizer, validate_bits
from .base import QuantizedModel

#: ``reference8``: every conv input at 8 bits (as the QwT ResNet reference runs);
#: ``true``: conv inputs at ``a_bits`` (stem and fc stay 8-bit).
ActMode = Literal["reference8", "true"]


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv (in place; conv gains a bias)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = (bn.weight if bn.affine else torch.ones_like(std)) / std
    shift = (bn.bias if bn.affine else torch.zeros_like(std)) - bn.running_mean * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    conv.bias = nn.Parameter(bias * scale + shift)


def _fold_all(model: nn.Module) -> None:
    """Fold conv→bn pairs of a timm/torchvision ResNet: stem, block convs and downsample."""
    pairs = [("conv1", "bn1")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for bname, blk in getattr(model, stage).named_children():
            prefix = f"{stage}.{bname}"
            for i in (1, 2, 3):
                if hasattr(blk, f"conv{i}") and hasattr(blk, f"bn{i}"):
                    pairs.append((f"{prefix}.conv{i}", f"{prefix}.bn{i}"))
            if isinstance(getattr(blk, "downsample", None), nn.Sequential):
                pairs.append((f"{prefix}.downsample.0", f"{prefix}.downsample.1"))
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            fold_batchnorm(model.get_submodule(conv_name), bn)
            model.set_submodule(bn_name, nn.Identity())


def quantize_resnet(model: nn.Module, w_bits: int, a_bits: int, act_mode: ActMode = "reference8",
                    act_percentile: float = 0.9999) -> QuantizedModel:
    """Percentile PTQ of a ResNet in place, with BatchNorm folded into the convs.

    Weights: per-output-channel min/max at ``w_bits`` (stem conv and fc at 8). Inputs: per-tensor
    clipping at the ``act_percentile`` quantile, at 8 bits for every conv in ``reference8`` mode
    or at ``a_bits`` in ``true`` mode (stem conv and fc inputs always 8). QwT blocks are the residual
    blocks ``layer{1..4}.{j}`` in the grouped-conv form.
    """
    validate_bits(w_bits, "w_bits")
    validate_bits(a_bits, "a_bits")
    if act_mode not in ("reference8", "true"):
        raise ValueError(f"act_mode={act_mode!r}: use 'reference8' or 'true'")
    if not all(hasattr(model, n) for n in ("conv1", "layer1", "layer4", "fc")):
        raise TypeError(f"{type(model).__name__} is not a ResNet (needs conv1, layer1..4, fc)")
    model.eval()
    _fold_all(model)
    conv_a_bits = 8 if act_mode == "reference8" else a_bits

    def weight_q(bits: int) -> PercentileQuantizer:
        return PercentileQuantizer(bits, percentile=1.0, channel_wise=True, channel_dim=0)

    def act_q(bits: int) -> PercentileQuantizer:
        return PercentileQuantizer(bits, percentile=act_percentile)

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d):
            wb, ab = (8, 8) if name == "conv1" else (w_bits, conv_a_bits)
            model.set_submodule(name, QuantConv2d.from_float(
                m, wb, ab, input_quantizer=act_q(ab), weight_quantizer=weight_q(wb)))
    fc = QuantLinear.from_float(model.fc, 8, 8, input_quantizer=act_q(8))
    fc.weight_quantizer = weight_q(8)
    model.fc = fc

    block_names = [f"{stage}.{bname}" for stage in ("layer1", "layer2", "layer3", "layer4")
                   for bname, _ in getattr(model, stage).named_children()]

    def first_block_input(images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` → stem output ``(B, 64, H/4, W/4)``."""
        act = model.act1 if hasattr(model, "act1") else model.relu
        x = act(model.bn1(model.conv1(images)))
        return model.maxpool(x)

    return QuantizedModel(model=model, ln_pairs=[], block_names=block_names,
                          first_block_input=first_block_input, form="conv",
                          meta={"family": "resnet", "w_bits": w_bits, "a_bits": a_bits,
                                "act_mode": act_mode})
