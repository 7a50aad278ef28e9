"""Build torchvision's ResNet-50 FPN Mask R-CNN (v1 or v2) and load a local checkpoint.

A checkpoint is either a plain ``state_dict`` (torchvision's released files, e.g.
``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``) or a dict ``{"model": state_dict, "model_kwargs":
{...}, "arch": ...}`` (torchvision's reference training scripts write ``{"model": ...}``; the
benchmark adds ``model_kwargs`` such as ``min_size``). The number of classes is read from the
box predictor. v1 is built as torchvision builds it for trained weights (``FrozenBatchNorm2d`` in
the ResNet trunk, three trainable stages), v2 with its ``BatchNorm2d`` layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

ARCHS: tuple[str, ...] = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
#: Keyword arguments of ``MaskRCNN`` that a checkpoint's ``model_kwargs`` may set.
MODEL_KWARGS: tuple[str, ...] = (
    "min_size", "max_size", "image_mean", "image_std", "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test", "box_detections_per_img", "box_score_thresh", "box_nms_thresh",
    "rpn_batch_size_per_image", "box_batch_size_per_image", "rpn_pre_nms_top_n_train",
    "rpn_post_nms_top_n_train", "box_head_dim", "mask_head_layers", "anchor_sizes")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or not this architecture)."""


def build_maskrcnn(arch: str = "maskrcnn_resnet50_fpn", num_classes: int = 91, frozen_bn: bool = True,
                   trainable_layers: int = 3, box_head_dim: Optional[int] = None,
                   mask_head_layers: Optional[Sequence[int]] = None,
                   anchor_sizes: Optional[Sequence[int]] = None, **kwargs: Any) -> nn.Module:
    """A randomly initialised torchvision Mask R-CNN of ``arch`` in eval mode (no download).

    Args:
        arch: ``maskrcnn_resnet50_fpn`` (v1) or ``maskrcnn_resnet50_fpn_v2``.
        num_classes: including the background class 0 (91 for torchvision's COCO models, whose labels
            are the COCO category ids).
        frozen_bn: v1 only: ``FrozenBatchNorm2d`` in the trunk (torchvision's trained v1 models);
            False gives ``BatchNorm2d`` (training from scratch; the state dict loads into either).
        trainable_layers: v1 only: trunk stages left trainable (3 as torchvision, 5 for all).
        box_head_dim, mask_head_layers: smaller RoI heads (the TwoMLPHead width, the mask head conv
            widths) than torchvision's 1024 and (256, 256, 256, 256); None: torchvision's.
        anchor_sizes: one RPN anchor size per FPN level (5; aspect ratios 0.5, 1, 2) for small
            images; None: torchvision's (32, 64, 128, 256, 512).
        kwargs: ``torchvision.models.detection.MaskRCNN`` arguments (``min_size``, ``max_size``, ...).
    """
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import misc

    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
    if arch == "maskrcnn_resnet50_fpn_v2":
        if box_head_dim is not None or mask_head_layers is not None or anchor_sizes is not None:
            raise ValueError("box_head_dim / mask_head_layers / anchor_sizes are for maskrcnn_resnet50_fpn (v1)")
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,
                                         **kwargs)
        return model.eval()
    # what maskrcnn_resnet50_fpn(weights=COCO_V1) builds: frozen BN, layer2..4 trainable
    trunk = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    heads: dict[str, Any] = {}
    if box_head_dim is not None or mask_head_layers is not None:
        dim = 1024 if box_head_dim is None else int(box_head_dim)
        layers = (256, 256, 256, 256) if mask_head_layers is None else tuple(int(c) for c in mask_head_layers)
        heads = dict(box_head=TwoMLPHead(256 * 7 * 7, dim), box_predictor=FastRCNNPredictor(dim, num_classes),
                     mask_head=MaskRCNNHeads(256, layers, 1),
                     mask_predictor=MaskRCNNPredictor(layers[-1], layers[-1], num_classes))
    if anchor_sizes is not None:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = tuple((int(a),) for a in anchor_sizes)
        if len(sizes) != 5:
            raise ValueError(f"anchor_sizes={list(anchor_sizes)}: give one size per FPN level (5)")
        heads["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    model = MaskRCNN(_resnet_fpn_extractor(trunk, trainable_layers),
                     num_classes=None if "box_predictor" in heads else num_classes, **heads, **kwargs)
    return model.eval()


def _read(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: one line naming it
        msg = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {msg}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def load_maskrcnn(path: str, arch: Optional[str] = None, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the Mask R-CNN stored in ``path`` and load its weights strictly (eval mode, CPU).

    Args:
        path: checkpoint file (see the module docstring).
        arch: ``maskrcnn_resnet50_fpn`` or ``_v2``; None: the checkpoint's ``arch`` entry, else v1.
        overrides: ``MaskRCNN`` keyword arguments that win over the checkpoint's ``model_kwargs``
            (None values ignored).
    Returns:
        ``(model, info)`` with ``info = {"arch", "num_classes", "model_kwargs", "tensors"}``.
    Raises:
        CheckpointError (one line) for a missing or unreadable file, a file without a Mask R-CNN box
        predictor, or keys / shapes that do not match ``arch``.
    """
    obj = _read(path)
    state = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
    kwargs = dict(obj.get("model_kwargs") or {}) if "model" in obj else {}
    arch = arch or obj.get("arch") or ARCHS[0]
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise CheckpointError(f"checkpoint {path}: unknown model_kwargs {unknown}")
    key = "roi_heads.box_predictor.cls_score.weight"
    if not isinstance(state.get(key), torch.Tensor):
        raise CheckpointError(f"checkpoint {path} is not a torchvision Mask R-CNN state_dict (no {key})")
    num_classes = int(state[key].shape[0])
    model = build_maskrcnn(arch, num_classes, **kwargs)
    expected = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.endswith("num_batches_tracked") and k not in expected)}  # FrozenBN drops them
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else \
            f"{len(extra)} unexpected keys (e.g. {extra[0]})"
        raise CheckpointError(f"checkpoint {path} does not match {arch}: {what}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"checkpoint {path} does not match {arch}: {bad[0]} has shape "
                              f"{tuple(state[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval(), {"arch": arch, "num_classes": num_classes, "model_kwargs": kwargs,
                          "tensors": len(state)}


def save_maskrcnn(model: nn.Module, path: str, arch: str = ARCHS[0],
                  model_kwargs: Optional[dict[str, Any]] = None) -> str:
    """Write ``{"model": state_dict, "arch", "model_kwargs"}`` that :func:`load_maskrcnn` reads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": arch, "model_kwargs": dict(model_kwargs or {})}, path)
    return path
