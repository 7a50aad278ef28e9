"""Stage I (data-free): synthetic calibration images for a torchvision Mask R-CNN, DFQ's ResNet recipe.

Objective (DFQ-SPEC §2.3, ResNet path), on images ``x`` in the detector's normalised input space::

    L(x) = 1.0 · L_det(Φ(x), y) + 0.05 · Σ_BN (‖σ²_run − σ²_batch‖₂ + ‖μ_run − μ_batch‖₂) + 1e-4 · TV_l2(x)

* ``L_det``: the Mask R-CNN training loss (RPN objectness + RPN box + RoI class + RoI box + mask)
  against the labels ``y``, with the RPN and RoI heads in training mode (proposal sampling) and every
  BatchNorm in eval mode (DFQ-SPEC §7.3: the teacher's statistics never move);
* the BatchNorm term: :class:`qwt_core.inversion.BNStatsPrior` on the input of every BatchNorm (the
  v1 trunk's ``FrozenBatchNorm2d`` layers are swapped, for the synthesis only, for eval-mode
  ``BatchNorm2d`` copies with the same buffers: the same function, visible to the prior);
* ``TV_l2``: :func:`qwt_core.inversion.total_variation`.

Schedule (§2.4): Adam (0.9, 0.999), lr 0.2, cosine to 0 without warm-up, 300 iterations (the
README's), pixels clamped to the valid range after each step (the README's ``--do_clip``). Labels
(§2.1, ResNet row): the real annotations of the calibration split in ascending id order, crowd
objects dropped, images without objects skipped, each label set flipped horizontally with
probability 0.5 (seeded per image); only the labels are read, never the pixels. The canvas is
``size × size`` (labels rescaled); the start is DFQ's: standard-normal noise in [0, 1] pixel units,
normalised. Shards and manifest: :mod:`qwt_core.synth_io` (task ``detection``).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from qwt_core.inversion import (BNStatsPrior, InversionConfig, batch_seed, frozen, init_noise, invert,
                                pixel_bounds, synthesize_batches)
from qwt_core.synth_io import SynthManifest, file_sha256, load_synthetic_set

#: DFQ-SPEC §2.3-2.4, ResNet path (``resnet/distill_data.py`` defaults, README iterations and clip).
DFQ_RESNET = dict(iterations=300, lr=0.2, betas=(0.9, 0.999), eps=1e-8, warmup=0, task_weight=1.0,
                  bn_weight=0.05, tv_weight=1e-4, clamp=True)


def dfq_resnet_config(**changes: Any) -> InversionConfig:
    """:class:`~qwt_core.inversion.InversionConfig` with DFQ's ResNet weights and schedule (``changes``
    override, e.g. ``iterations=50`` for a CPU run)."""
    return InversionConfig(**{**DFQ_RESNET, **changes})


def with_batchnorm2d(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``FrozenBatchNorm2d`` layers are eval-mode ``nn.BatchNorm2d`` with the
    same weight, bias, running statistics and eps (same function; hookable by ``BNStatsPrior``)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "FrozenBatchNorm2d":
            bn = nn.BatchNorm2d(m.weight.numel(), eps=m.eps).to(m.weight.device)
            with torch.no_grad():
                bn.weight.copy_(m.weight)
                bn.bias.copy_(m.bias)
                bn.running_mean.copy_(m.running_mean)
                bn.running_var.copy_(m.running_var)
            model.set_submodule(name, bn.eval())
    return model


@contextlib.contextmanager
def loss_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters frozen; RPN and RoI heads in training mode (they return losses), everything else —
    every BatchNorm included — in eval mode; restored on exit."""
    with frozen(model):
        model.rpn.train()
        model.roi_heads.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        try:
            yield model
        finally:
            model.eval()


def detection_loss(model: nn.Module, x: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor]:
    """Mask R-CNN training losses on normalised images ``x`` ``(B, 3, H, W)`` (no resize: the
    canvas is the input) against ``targets`` (``boxes (n, 4)`` xyxy, ``labels (n,)``, ``masks (n, H, W)``).
    Call inside :func:`loss_mode`."""
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(x, [tuple(x.shape[-2:])] * x.shape[0])
    feats = model.backbone(x)
    proposals, rpn_losses = model.rpn(images, feats, list(targets))
    _, roi_losses = model.roi_heads(feats, proposals, images.image_sizes, list(targets))
    return {**rpn_losses, **roi_losses}


def coco_labels(coco_root: str, split: str, size: int, seed: int = 0, flip: bool = True,
                max_images: Optional[int] = None) -> list[dict[str, Any]]:
    """Label sets of the non-empty images of a COCO split (ascending id; crowd objects dropped), each
    rescaled to ``size × size`` and flipped horizontally with probability 0.5 (``random`` seeded with
    ``seed + image_id``): ``{"boxes": (n, 4) float xyxy, "labels": (n,) long = category ids,
    "masks": (n, size, size) uint8, "image_id", "flip", "orig_size"}``."""
    import io
    import random

    import numpy as np
    import torch.nn.functional as F
    from pycocotools.coco import COCO

    from det_torchvision.data import annotation_path

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_path(coco_root, split)))
    out = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 1 and a["bbox"][3] > 1]
        if not anns:
            continue
        h, w = info["height"], info["width"]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
        boxes *= torch.tensor([size / w, size / h, size / w, size / h])
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()
        masks = (F.interpolate(masks[None], size=(size, size), mode="nearest")[0] > 0.5).to(torch.uint8)
        flipped = flip and random.Random(seed + img_id).random() < 0.5
        if flipped:
            boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
            masks = masks.flip(-1)
        out.append({"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]),
                    "masks": masks, "image_id": int(img_id), "flip": bool(flipped), "orig_size": [h, w]})
        if max_images is not None and len(out) >= max_images:
            break
    return out


def synthesize(model: nn.Module, labels: Sequence[dict[str, Any]], out_dir: str, size: int,
               config: InversionConfig, batch_size: int, seed: int = 0, checkpoint: Optional[str] = None,
               arch: str = "maskrcnn_resnet50_fpn", rank: int = 0, world_size: int = 1,
               progress: bool = True, barrier: Optional[Callable[[], None]] = None) -> SynthManifest:
    """Write a synthetic set of ``len(labels)`` images (``size × size``) to ``out_dir``; resumable.

    Args:
        model: the FP teacher (unchanged; a BatchNorm2d copy is optimised against).
        labels: from :func:`coco_labels`, one per image.
        config: e.g. :func:`dfq_resnet_config`.
        batch_size: images per generation batch (32 in DFQ's README).
        checkpoint: the teacher's file (its sha256 goes into the manifest).
        rank, world_size: this process's share of the batches (``synthesize_batches``).
        barrier: waits for every rank (e.g. ``torch.distributed.barrier``) before rank 0 writes the
            final manifest; None in a single process.
    Returns:
        The manifest (complete on rank 0 once every rank is done).
    """
    teacher = with_batchnorm2d(model).eval()
    mean = [float(v) for v in teacher.transform.image_mean]
    std = [float(v) for v in teacher.transform.image_std]
    device = next(teacher.parameters()).device
    m_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    bounds = pixel_bounds(mean, std, 1.0)
    manifest = SynthManifest(
        task="detection", seed=int(seed), label_source="coco",
        hparams={**config.to_dict(), "objective": "det + bn + tv (DFQ ResNet)", "size": int(size)},
        teacher={"model": arch, "checkpoint": checkpoint,
                 "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None},
        mean=mean, std=std, image_size=[size, size], num_images=len(labels), batch_size=int(batch_size))

    def make_batch(k: int, idx: list[int]):
        tg = [{"boxes": labels[i]["boxes"].to(device), "labels": labels[i]["labels"].to(device),
               "masks": labels[i]["masks"].to(device)} for i in idx]
        x0 = (init_noise(idx, (3, size, size), seed, device) - m_t) / s_t  # DFQ: randn in [0, 1] units
        torch.manual_seed(batch_seed(seed, idx))
        with loss_mode(teacher), BNStatsPrior(teacher) as bn:
            res = invert(x0, lambda x, it: detection_loss(teacher, x, tg), config, priors=[bn],
                         bounds=bounds, progress=progress, desc=f"batch {k}")
        targets = [{"bboxes": t["boxes"].cpu(), "labels": t["labels"].cpu(), "masks": t["masks"].cpu()} for t in tg]
        meta = [{"image_id": labels[i]["image_id"], "flip": labels[i]["flip"], "orig_size": labels[i]["orig_size"],
                 "final_loss": res.history[-1]} for i in idx]
        return res.images, targets, meta

    return synthesize_batches(out_dir, manifest, make_batch, rank=rank, world_size=world_size, progress=progress,
                              barrier=barrier)


def synthetic_images(folder: str, n: Optional[int] = None, checkpoint: Optional[str] = None) -> torch.Tensor:
    """The first ``n`` images of a synthetic set as ``(n, 3, S, S)`` in [0, 1] (the calibration
    functions' input), i.e. ``x · std + mean``; checks the teacher's sha256 when ``checkpoint`` is given."""
    expected = {"checkpoint_sha256": file_sha256(checkpoint)} if checkpoint else None
    sset = load_synthetic_set(folder, expected_teacher=expected, task="detection")
    count = len(sset) if n is None else min(n, len(sset))
    x = sset.images(list(range(count)))
    m = torch.tensor(sset.manifest.mean).view(1, 3, 1, 1)
    s = torch.tensor(sset.manifest.std).view(1, 3, 1, 1)
    return (x * s + m).clamp_(0, 1)
