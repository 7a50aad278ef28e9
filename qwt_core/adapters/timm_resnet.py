"""Percentile-baseline adapter for timm / torchvision-style ResNets (QwT grouped-conv form).

Two recipes (``recipe=``):

* ``"published"`` (default) — the QwT ResNet reference (``qwt_resnet_group_conv_only_percentile``),
  point by point:

  - BatchNorm is **not** folded: every BatchNorm stays an fp32 module after its fake-quant conv;
    ReLU, max-pool, residual adds and the average pool stay fp32;
  - weights: per output channel, inputs: per tensor, both with the RepQ-ViT
    :class:`~qwt_core.quantizers.UniformQuantizer` (clipping candidates at the 0.999 / 0.9999 /
    0.99999 quantiles, the one with the smallest MSE wins);
  - stem ``conv1`` and ``fc`` at W8/A8; every other conv at ``W = w_bits``; conv inputs at 8 bits
    in ``act_mode="reference8"`` (what the reference runs) or at ``a_bits`` in ``act_mode="true"``;
  - quantizers initialise lazily in ONE forward of the calibration batch (32 images);
  - QwT (``QuantizedModel.qwt_kwargs``): per residual block ``layer{1..4}.{j}`` a grouped 1×1 conv on
    the block input (``C_in // 64`` groups, stride from the output size), fitted by ridge least
    squares with λ = 1e-3 on all columns including the intercept, and applied when its in-sample
    R² > 0 with SS_tot taken around the per-(channel, position) mean over the batch.

* ``"folded"`` — the same quantizers, bits and QwT settings, with every BatchNorm folded into the
  preceding conv before quantization (what a deployment runs: the quantized weight is the folded one).

The recipe actually used is recorded in ``QuantizedModel.meta["recipe"]`` (JSON friendly).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..modules import QuantConv2d, QuantLinear
from ..quantizers import CANDIDATE_PERCENTILES, UniformQuantizer, validate_bits
from .base import QuantizedModel

#: ``reference8``: every conv input at 8 bits (as the QwT ResNet reference runs);
#: ``true``: conv inputs at ``a_bits`` (stem and fc stay 8-bit).
ActMode = Literal["reference8", "true"]
#: ``published``: BatchNorm kept as fp32 modules (the reference); ``folded``: BatchNorm folded.
Recipe = Literal["published", "folded"]
ACT_MODES: tuple[str, ...] = ("reference8", "true")
RECIPES: tuple[str, ...] = ("published", "folded")

#: QwT settings of the published ResNet script, handed to ``apply_qwt`` by ``qwt_core.compensate``.
PUBLISHED_QWT_KWARGS: dict[str, Any] = {
    "conv_kernel": 1,                      # --kernel_size 1
    "conv_group_channels": 64,             # --factor 64: groups = max(C_in // 64, 1)
    "ridge": 1e-3,                         # λ·I added to AᵀA, intercept column included
    "gate": "insample",                    # compensate iff in-sample R² > 0
    "conv_r2_mean": "channel_position",    # SS_tot around the per-(channel, position) batch mean
}


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv (in place; conv gains a bias)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = (bn.weight if bn.affine else torch.ones_like(std)) / std
    shift = (bn.bias if bn.affine else torch.zeros_like(std)) - bn.running_mean * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    conv.bias = nn.Parameter(bias * scale + shift)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs of a ResNet: ``convN → bnN`` siblings (stem and blocks) and
    consecutive ``Conv2d, BatchNorm2d`` children of a Sequential (``downsample``)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = dict(parent.named_children())
        for name, child in children.items():
            if isinstance(child, nn.Conv2d) and name.startswith("conv"):
                bn = children.get("bn" + name[len("conv"):])
                if isinstance(bn, nn.BatchNorm2d):
                    pairs.append((prefix + name, prefix + "bn" + name[len("conv"):]))
        if isinstance(parent, nn.Sequential):
            items = list(children.items())
            for (n1, m1), (n2, m2) in zip(items, items[1:]):
                if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d):
                    pairs.append((prefix + n1, prefix + n2))
    return pairs


def fold_all_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm2d of a ResNet into its conv (BN becomes ``nn.Identity``); returns the count.

    Raises ``ValueError`` (before changing anything) if a BatchNorm2d has no preceding conv.
    """
    pairs = _conv_bn_pairs(model)
    paired = {bn for _, bn in pairs}
    orphans = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n not in paired]
    if orphans:
        raise ValueError(f"cannot fold BatchNorm {orphans[0]!r}: no conv directly before it; "
                         "use recipe='published' (BatchNorm kept as a module)")
    for conv_name, bn_name in pairs:
        fold_batchnorm(model.get_submodule(conv_name), model.get_submodule(bn_name))
        model.set_submodule(bn_name, nn.Identity())
    return len(pairs)


def is_stem(name: str) -> bool:
    """True for the stem conv (``conv1``, or a layer of a deep stem ``conv1.*``)."""
    return name == "conv1" or name.startswith("conv1.")


def resnet_layer_bits(name: str, w_bits: int, a_bits: int, act_mode: ActMode) -> tuple[int, int]:
    """``(weight bits, input bits)`` of the conv / Linear ``name`` of a ResNet.

    Stem conv and ``fc``: 8/8. Other convs: ``w_bits`` weights; inputs at 8 (``reference8``) or
    ``a_bits`` (``true``).
    """
    if is_stem(name) or name == "fc":
        return 8, 8
    return w_bits, 8 if act_mode == "reference8" else a_bits


def weight_quantizer(bits: int) -> UniformQuantizer:
    """Per-output-channel RepQ-ViT uniform quantizer (three candidate percentiles, MSE)."""
    return UniformQuantizer(bits, channel_wise=True, channel_dim=0)


def act_quantizer(bits: int) -> UniformQuantizer:
    """Per-tensor RepQ-ViT uniform quantizer (three candidate percentiles, MSE)."""
    return UniformQuantizer(bits)


def recipe_record(recipe: Recipe, w_bits: int, a_bits: int, act_mode: ActMode,
                  n_folded: int = 0) -> dict[str, Any]:
    """The recipe as a JSON-friendly dict (written to results JSON and saved-model meta)."""
    conv_w, conv_a = resnet_layer_bits("layer1.0.conv1", w_bits, a_bits, act_mode)
    return {
        "name": recipe,
        "bn_folded": recipe == "folded",
        "bn_folded_count": n_folded,
        "weight_quantizer": "uniform, per output channel, MSE over clipping percentiles",
        "act_quantizer": "uniform, per tensor, MSE over clipping percentiles",
        "percentiles": list(CANDIDATE_PERCENTILES),
        "act_mode": act_mode,
        "bits": {"conv1": [8, 8], "fc": [8, 8], "other_convs": [conv_w, conv_a]},
        "calibration": "lazy init in one forward of the calibration batch",
        "qwt": {"form": "conv", **PUBLISHED_QWT_KWARGS},
    }


def quantize_resnet(model: nn.Module, w_bits: int, a_bits: int, act_mode: ActMode = "reference8",
                    recipe: Recipe = "published") -> QuantizedModel:
    """Percentile PTQ of a timm / torchvision ResNet in place (see the module docstring).

    Args:
        model: ResNet with ``conv1``, ``layer1..4`` and ``fc`` (timm or torchvision layout).
        w_bits, a_bits: 2..8. Stem conv and fc are always W8/A8.
        act_mode: ``reference8`` (conv inputs at 8 bits, the reference) or ``true`` (at ``a_bits``).
        recipe: ``published`` (BatchNorm kept, default) or ``folded`` (BatchNorm folded first).
    Returns:
        A :class:`QuantizedModel` with ``form="conv"``, blocks ``layer{1..4}.{j}`` and the published
        QwT settings in ``qwt_kwargs``; ``meta["recipe"]`` records the recipe.
    """
    validate_bits(w_bits, "w_bits")
    validate_bits(a_bits, "a_bits")
    if act_mode not in ACT_MODES:
        raise ValueError(f"act_mode={act_mode!r}: use 'reference8' or 'true'")
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: use 'published' (BatchNorm kept) or 'folded'")
    if not all(hasattr(model, n) for n in ("conv1", "layer1", "layer4", "fc")):
        raise TypeError(f"{type(model).__name__} is not a ResNet (needs conv1, layer1..4, fc)")
    if not isinstance(model.fc, nn.Linear):
        raise TypeError(f"model.fc is {type(model.fc).__name__}, expected nn.Linear (a classifier head)")
    model.eval()
    n_folded = fold_all_batchnorms(model) if recipe == "folded" else 0

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d):
            wb, ab = resnet_layer_bits(name, w_bits, a_bits, act_mode)
            model.set_submodule(name, QuantConv2d.from_float(
                m, wb, ab, input_quantizer=act_quantizer(ab), weight_quantizer=weight_quantizer(wb)))
    if not isinstance(model.fc, QuantLinear):
        fc = QuantLinear.from_float(model.fc, 8, 8, input_quantizer=act_quantizer(8))
        fc.weight_quantizer = weight_quantizer(8)
        model.fc = fc

    block_names = [f"{stage}.{bname}" for stage in ("layer1", "layer2", "layer3", "layer4")
                   for bname, _ in getattr(model, stage).named_children()]

    def first_block_input(images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` → stem output ``(B, 64, H/4, W/4)`` (input of ``layer1.0``)."""
        act = model.act1 if hasattr(model, "act1") else model.relu
        x = act(model.bn1(model.conv1(images)))
        return model.maxpool(x)

    return QuantizedModel(model=model, ln_pairs=[], block_names=block_names,
                          first_block_input=first_block_input, form="conv",
                          meta={"family": "resnet", "w_bits": w_bits, "a_bits": a_bits,
                                "act_mode": act_mode, "resnet_recipe": recipe,
                                "recipe": recipe_record(recipe, w_bits, a_bits, act_mode, n_folded)},
                          qwt_kwargs=dict(PUBLISHED_QWT_KWARGS))
