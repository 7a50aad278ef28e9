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
  - QwT (``QuantizedModel.qwt_config``): per residual block ``layer{1..4}.{j}`` a grouped 1×1 conv on
    the block input (``C_in // 64`` groups, stride from the output size), fitted by ridge least
    squares with λ = 1e-3 on all columns including the intercept, and applied when its in-sample
    R² > 0 with SS_tot taken around the per-(channel, position) mean over the batch.

* ``"folded"`` — the same quantizers, bits and QwT settings, with every BatchNorm folded into the
  preceding conv before quantization (what a deployment runs: the quantized weight is the folded one).

The recipe actually used is recorded in ``QuantizedModel.meta["recipe"]`` (JSON friendly).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn

from ..config import QwTConfig
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

#: QwT settings of the published ResNet script (``qwt_core.compensate``'s default for these models).
PUBLISHED_QWT_CONFIG = QwTConfig(
    conv_kernel=1,                      # --kernel_size 1
    conv_group_channels=64,             # --factor 64: groups = max(C_in // 64, 1)
    ridge=1e-3,                         # λ·I added to AᵀA, intercept column included
    gate="insample",                    # compensate iff in-sample R² > 0
    conv_r2_mean="channel_position",    # SS_tot around the per-(channel, position) batch mean
)


def is_batchnorm(module: nn.Module) -> bool:
    """True for ``nn.BatchNorm2d`` and torchvision's ``FrozenBatchNorm2d`` (the detection backbones'
    norm: fixed statistics and affine parameters, held as buffers); matched by class name so that
    this module imports no torchvision."""
    return isinstance(module, nn.BatchNorm2d) or type(module).__name__ == "FrozenBatchNorm2d"


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm (``nn.BatchNorm2d`` or ``FrozenBatchNorm2d``) into the preceding
    conv (in place; conv gains a bias)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    affine = getattr(bn, "affine", True)  # FrozenBatchNorm2d always has weight and bias
    scale = (bn.weight if affine else torch.ones_like(std)) / std
    shift = (bn.bias if affine else torch.zeros_like(std)) - bn.running_mean * scale
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
                if bn is not None and is_batchnorm(bn):
                    pairs.append((prefix + name, prefix + "bn" + name[len("conv"):]))
        if isinstance(parent, nn.Sequential):
            items = list(children.items())
            for (n1, m1), (n2, m2) in zip(items, items[1:]):
                if isinstance(m1, nn.Conv2d) and is_batchnorm(m2):
                    pairs.append((prefix + n1, prefix + n2))
    return pairs


def fold_all_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm2d (or ``FrozenBatchNorm2d``) of a ResNet into its conv (BN becomes
    ``nn.Identity``); returns the count.

    Raises ``ValueError`` (before changing anything) if a BatchNorm has no preceding conv.
    """
    pairs = _conv_bn_pairs(model)
    paired = {bn for _, bn in pairs}
    orphans = [n for n, m in model.named_modules() if is_batchnorm(m) and n not in paired]
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
        "qwt": {"form": "conv", **PUBLISHED_QWT_CONFIG.to_dict()},
    }


def swap_convs(model: nn.Module,
               bits_of: Callable[[str, nn.Conv2d], Optional[tuple[int, int]]]) -> list[str]:
    """Replace each ``nn.Conv2d`` of ``model`` for which ``bits_of(name, conv)`` gives ``(w, a)`` bits
    by a :class:`QuantConv2d` with the recipe's quantizers (:func:`weight_quantizer` per output
    channel, :func:`act_quantizer` per tensor); parameters shared. Returns the swapped names in
    module order."""
    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d):
            bits = bits_of(name, m)
            if bits is None:
                continue
            wb, ab = bits
            model.set_submodule(name, QuantConv2d.from_float(
                m, wb, ab, input_quantizer=act_quantizer(ab), weight_quantizer=weight_quantizer(wb)))
            swapped.append(name)
    return swapped


STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")


def resnet_block_names(body: nn.Module, prefix: str = "") -> list[str]:
    """Residual blocks of a ResNet trunk in forward order: ``{prefix}layer{1..4}.{j}``."""
    return [f"{prefix}{stage}.{bname}" for stage in STAGES
            for bname, _ in getattr(body, stage).named_children()]


def resnet_stem(body: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The stem of a timm / torchvision ResNet trunk (also torchvision's ``IntermediateLayerGetter``
    body of a detection backbone) as a function: normalised images ``(B, 3, H, W)`` → stem output
    ``(B, 64, H/4, W/4)``, the input of ``layer1.0``."""

    def first_block_input(images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` → stem output ``(B, 64, H/4, W/4)`` (input of ``layer1.0``)."""
        act = body.act1 if hasattr(body, "act1") else body.relu
        x = act(body.bn1(body.conv1(images)))
        return body.maxpool(x)

    return first_block_input


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
        QwT settings in ``qwt_config``; ``meta["recipe"]`` records the recipe.
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

    swap_convs(model, lambda name, m: resnet_layer_bits(name, w_bits, a_bits, act_mode))
    if not isinstance(model.fc, QuantLinear):
        fc = QuantLinear.from_float(model.fc, 8, 8, input_quantizer=act_quantizer(8))
        fc.weight_quantizer = weight_quantizer(8)
        model.fc = fc

    block_names = resnet_block_names(model)
    first_block_input = resnet_stem(model)
    return QuantizedModel(model=model, ln_pairs=[], block_names=block_names,
                          first_block_input=first_block_input, form="conv",
                          meta={"family": "resnet", "w_bits": w_bits, "a_bits": a_bits,
                                "act_mode": act_mode, "resnet_recipe": recipe,
                                "recipe": recipe_record(recipe, w_bits, a_bits, act_mode, n_folded)},
                          qwt_config=PUBLISHED_QWT_CONFIG)


def quantize_resnet_body(model: nn.Module, body: str, w_bits: int, a_bits: int,
                         layers: Sequence[str], act_mode: ActMode = "true", recipe: Recipe = "published",
                         preprocess: Optional[Callable[[Any], torch.Tensor]] = None,
                         meta: Optional[dict[str, Any]] = None) -> QuantizedModel:
    """The Percentile recipe on a ResNet trunk inside a larger model (e.g. a detector), in place.

    The same quantizers, bits and QwT settings as :func:`quantize_resnet`, on the convs named in
    ``layers`` only (qualified names in ``model``; convs outside the trunk, e.g. an FPN, allowed):
    a conv of the trunk gets :func:`resnet_layer_bits` of its name inside the trunk (stem 8/8), any
    other conv ``w_bits`` weights and inputs at 8 (``reference8``) or ``a_bits`` (``true``, the default
    here). Every other layer stays fp32. QwT blocks: the residual blocks ``{body}.layer{1..4}.{j}``
    that hold a quantized conv (they must be consecutive), starting from the trunk's stem.

    Args:
        model: the model holding the trunk; ``model.get_submodule(body)`` needs ``conv1``, ``bn1``,
            ``maxpool`` and ``layer1..4`` (timm, torchvision ``ResNet`` or ``IntermediateLayerGetter``).
        body: qualified name of the trunk (``""`` for the model itself).
        w_bits, a_bits: 2..8.
        layers: qualified names of the ``nn.Conv2d`` to quantize.
        act_mode, recipe: as for :func:`quantize_resnet` (``folded`` folds every BatchNorm of ``model``).
        preprocess: batch → normalised images ``(B, 3, H, W)`` fed to the stem (e.g. a detector's
            resize/normalise transform); None: the batch is already that tensor.
        meta: extra JSON-friendly entries for ``QuantizedModel.meta``.
    Returns:
        A :class:`QuantizedModel` with ``form="conv"`` and the published QwT settings.
    Raises:
        ValueError/TypeError before any change for bad bits, an unknown or non-conv layer name, a
        trunk that is not a ResNet, or quantized blocks that are not consecutive.
    """
    validate_bits(w_bits, "w_bits")
    validate_bits(a_bits, "a_bits")
    if act_mode not in ACT_MODES:
        raise ValueError(f"act_mode={act_mode!r}: use 'reference8' or 'true'")
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: use 'published' (BatchNorm kept) or 'folded'")
    trunk = model.get_submodule(body) if body else model
    if not all(hasattr(trunk, n) for n in ("conv1", "bn1", "maxpool", *STAGES)):
        raise TypeError(f"{body or 'model'} ({type(trunk).__name__}) is not a ResNet trunk "
                        "(needs conv1, bn1, maxpool, layer1..4)")
    modules = dict(model.named_modules())
    wanted = list(dict.fromkeys(layers))
    for name in wanted:
        if not isinstance(modules.get(name), nn.Conv2d):
            raise ValueError(f"layer {name!r} is not an nn.Conv2d of {type(model).__name__}")
    if not wanted:
        raise ValueError("layers is empty: name the convs to quantize")
    prefix = f"{body}." if body else ""
    blocks_all = resnet_block_names(trunk, prefix)
    chosen = set(wanted)
    has_quant = [any(n == b or n.startswith(b + ".") for n in chosen) for b in blocks_all]
    idx = [i for i, h in enumerate(has_quant) if h]
    if idx and idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError("the quantized residual blocks must be consecutive (QwT propagates each "
                         f"block's output to the next); got a gap after {blocks_all[idx[0]]!r}")
    if idx and idx[0] != 0:
        raise ValueError(f"the first quantized residual block is {blocks_all[idx[0]]!r}: QwT starts "
                         "from the stem, so layer1.0 must hold a quantized conv")
    model.eval()
    n_folded = fold_all_batchnorms(model) if recipe == "folded" else 0

    def bits_of(name: str, _m: nn.Conv2d) -> Optional[tuple[int, int]]:
        if name not in chosen:
            return None
        if prefix and not name.startswith(prefix):
            return w_bits, 8 if act_mode == "reference8" else a_bits
        return resnet_layer_bits(name[len(prefix):], w_bits, a_bits, act_mode)

    swapped = swap_convs(model, bits_of)
    block_names = [blocks_all[i] for i in idx]
    stem = resnet_stem(trunk)

    def first_block_input(batch: Any) -> torch.Tensor:
        """batch → (``preprocess``) → stem output ``(B, 64, H/4, W/4)``, the input of ``layer1.0``."""
        return stem(preprocess(batch) if preprocess is not None else batch)

    record = recipe_record(recipe, w_bits, a_bits, act_mode, n_folded)
    record["bits"] = {"stem": list(resnet_layer_bits("conv1", w_bits, a_bits, act_mode)) if
                      f"{prefix}conv1" in chosen else None,
                      "other_convs": list(record["bits"]["other_convs"])}
    record["quantized_layers"] = swapped
    return QuantizedModel(model=model, ln_pairs=[], block_names=block_names,
                          first_block_input=first_block_input, form="conv",
                          meta={"family": "resnet", "w_bits": w_bits, "a_bits": a_bits,
                                "act_mode": act_mode, "resnet_recipe": recipe, "body": body,
                                "recipe": record, **(meta or {})},
                          qwt_config=PUBLISHED_QWT_CONFIG)
