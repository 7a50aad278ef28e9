"""Percentile PTQ + QwT for torchvision's ResNet-FPN R-CNN detectors (Mask / Faster R-CNN).

The ResNet recipe is :mod:`qwt_core.adapters.timm_resnet`'s (three-candidate MSE quantizers, weights
per output channel, inputs per tensor, BatchNorm — torchvision's ``FrozenBatchNorm2d`` — kept as an
fp32 module), applied by :func:`~qwt_core.adapters.timm_resnet.quantize_resnet_body` to the trunk
``backbone.body``; this module only names the layers and the detector's preprocessing.

Layer sets (``layer_set=``):

* ``"paper"`` (default) — the zero-shot QAT paper's ResNet-50 Mask R-CNN set: every conv of the
  residual blocks of ``layer1..layer4`` (``conv1..3`` and ``downsample.0``) except the last block of
  ``layer4``, and the FPN lateral (``inner_blocks``) and output (``layer_blocks``) convs of levels
  C3–C5. Stem, C2-level FPN convs, RPN and RoI heads stay full precision.
* ``"all"`` — every conv of the backbone (stem at W8/A8, as in the ResNet recipe) and of the FPN.

QwT (``form="conv"``, the published grouped 1×1 conv form) runs over the residual blocks holding a
quantized conv (``layer1.0 .. layer4.{n-2}`` for ``"paper"``); its calibration batches are lists (or
a batch tensor) of images in [0, 1], which go through the detector's own ``GeneralizedRCNNTransform``
(normalise, resize, pad) before the stem. The FPN output convs can be compensated one by one with
:func:`fpn_output_blocks` / :func:`fpn_block_input`.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from .base import QuantizedModel
from .timm_resnet import ActMode, Recipe, quantize_resnet_body, resnet_block_names

LayerSet = Literal["paper", "all"]
LAYER_SETS: tuple[str, ...] = ("paper", "all")
BODY = "backbone.body"
FPN = "backbone.fpn"


def _check_detector(model: nn.Module) -> None:
    for name in (BODY, FPN, "transform"):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise TypeError(f"{type(model).__name__} has no {name!r}: expected a torchvision "
                            "ResNet-FPN R-CNN (e.g. maskrcnn_resnet50_fpn)") from None
    fpn = model.get_submodule(FPN)
    if not (hasattr(fpn, "inner_blocks") and hasattr(fpn, "layer_blocks")):
        raise TypeError(f"{FPN} ({type(fpn).__name__}) is not a torchvision FeaturePyramidNetwork")


def _convs(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]


def fpn_levels(model: nn.Module) -> list[str]:
    """The trunk stage feeding each FPN level, in FPN order: ``["layer1", ..., "layer4"]`` for the
    default ``returned_layers`` (level ``i`` of ``inner_blocks`` / ``layer_blocks`` reads that stage)."""
    body = model.get_submodule(BODY)
    return list(getattr(body, "return_layers", {}).keys())


def detector_layer_names(model: nn.Module, layer_set: LayerSet = "paper") -> list[str]:
    """Qualified names of the convs quantized by ``layer_set`` (see the module docstring), in module order."""
    _check_detector(model)
    if layer_set not in LAYER_SETS:
        raise ValueError(f"layer_set={layer_set!r}: use 'paper' or 'all'")
    body = model.get_submodule(BODY)
    fpn = model.get_submodule(FPN)
    if layer_set == "all":
        return _convs(body, BODY) + _convs(fpn, FPN)
    blocks = resnet_block_names(body)
    names = [n for blk in blocks[:-1] for n in _convs(body.get_submodule(blk), f"{BODY}.{blk}")]
    levels = fpn_levels(model)
    for kind in ("inner_blocks", "layer_blocks"):
        for i, stage in enumerate(levels):
            if stage != "layer1":  # C2 stays full precision
                names += _convs(getattr(fpn, kind)[i], f"{FPN}.{kind}.{i}")
    order = {n: k for k, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=order.__getitem__)


def preprocess(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """Batch (a tensor ``(B, 3, H, W)`` or a list of ``(3, H_i, W_i)`` images in [0, 1]) → the padded,
    normalised, resized batch ``(B, 3, H', W')`` that the detector's backbone reads."""

    def run(batch: Any) -> torch.Tensor:
        images = list(batch)
        return model.transform(images)[0].tensors

    return run


def quantize_torchvision_rcnn(model: nn.Module, w_bits: int, a_bits: int, layer_set: LayerSet = "paper",
                              act_mode: ActMode = "true", recipe: Recipe = "published") -> QuantizedModel:
    """Percentile PTQ of a torchvision ResNet-FPN R-CNN in place (eval mode).

    Args:
        model: e.g. ``torchvision.models.detection.maskrcnn_resnet50_fpn(...)`` (v1 or v2).
        w_bits, a_bits: 2..8 for the quantized convs (the stem, quantized only in ``"all"``, is 8/8).
        layer_set: ``"paper"`` (default) or ``"all"`` (module docstring).
        act_mode: ``"true"`` (default: conv inputs at ``a_bits``) or ``"reference8"`` (at 8 bits).
        recipe: ``"published"`` (BatchNorm kept, default) or ``"folded"``.
    Returns:
        A :class:`QuantizedModel` whose QwT blocks are the quantized residual blocks of
        ``backbone.body`` and whose ``first_block_input`` takes a list / tensor of [0, 1] images.
    """
    layers = detector_layer_names(model, layer_set)
    return quantize_resnet_body(model, BODY, w_bits, a_bits, layers, act_mode=act_mode, recipe=recipe,
                                preprocess=preprocess(model),
                                meta={"family": "torchvision_rcnn", "layer_set": layer_set})


def fpn_output_blocks(model: nn.Module) -> list[str]:
    """Names of the quantized FPN output convs (``backbone.fpn.layer_blocks.{i}``), in FPN order."""
    from ..modules import QuantConv2d

    fpn = model.get_submodule(FPN)
    return [f"{FPN}.layer_blocks.{i}" for i, blk in enumerate(fpn.layer_blocks)
            if any(isinstance(m, QuantConv2d) for m in blk.modules())]


def fpn_block_input(model: nn.Module, block: str) -> Callable[[Any], torch.Tensor]:
    """Batch of [0, 1] images → the input of FPN block ``block`` computed by the (quantized,
    possibly compensated) model: the top-down sum the output conv reads, ``(B, 256, H_l, W_l)``."""
    target = model.get_submodule(block)
    pre = preprocess(model)

    def run(batch: Any) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = target.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
        try:
            model.backbone(pre(batch))
        finally:
            hook.remove()
        if len(seen) != 1:
            raise RuntimeError(f"{block} ran {len(seen)} times in one backbone forward")
        return seen[0]

    return run


def layer_names_by_kind(names: Sequence[str]) -> dict[str, list[str]]:
    """Group quantized-layer names into ``body`` / ``fpn`` (for reports)."""
    return {"body": [n for n in names if n.startswith(BODY + ".")],
            "fpn": [n for n in names if n.startswith(FPN + ".")]}
