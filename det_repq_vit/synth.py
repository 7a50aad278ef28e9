"""Data-free calibration images for mmdet 3.x Swin Mask / Cascade Mask R-CNN (DFQ Stage I).

The images are optimised by :func:`qwt_core.inversion.invert` against the FP detector with
``det_weight · L_det + pse_weight · L_PSE + tv_weight · L_TV`` (DFQ: 10 / 1 / 0.001 at B = 12, 640²;
the TV weight is rescaled for other batch sizes and resolutions). ``L_det`` is the detector's own
training loss (``model.loss`` + ``parse_losses``) with the labels below as ground truth.

Labels (``DetSynthConfig.labels``):

* ``sampled`` (no real data): Adaptive Label Sampling (DFQ's YOLO11 ALS, ported here to Mask R-CNN):
  one-box seeds (:func:`sample_seed_label`: ``w, h ~ U(0.2, 0.8)·S``, the box inside the canvas,
  uniform class, mask = the filled box), optimised at ``label_size`` for ``label_iterations`` while
  every ``relabel_every`` iterations in ``[relabel_start, relabel_end]`` the teacher's own confident
  detections update the labels (:func:`als_update`: add / remove / area rules; added masks = the
  teacher's masks thresholded at 0.5). The final labels are rescaled to ``image_size`` and the
  final images start from fresh noise with the labels frozen.
* ``coco``: real COCO train annotations (classes, boxes, masks; crowd objects dropped, images
  without objects skipped) drawn on the ``image_size`` canvas, with synthetic pixels (what DFQ's
  Swin code does). Only annotations are read, never the images.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwt_core.inversion import (InversionConfig, PatchSimilarityPrior, batch_seed, explicit_attention,
                                frozen, init_noise, invert, pixel_bounds)

#: offsets separating the per-image random streams (image i uses base + offset + i)
LABEL_NOISE_OFFSET = 1_000_003
SEED_LABEL_OFFSET = 2_000_003
#: DFQ tuned its TV weight at batch 12, 3 x 640 x 640 (the TV term grows as sqrt(numel))
DFQ_TV_REFERENCE_NUMEL = 12 * 3 * 640 * 640


@dataclass
class LabelSet:
    """Labels of one image on a square canvas of ``size`` pixels.

    bboxes: ``(n, 4)`` float xyxy pixels; labels: ``(n,)`` long; masks: ``(n, size, size)`` uint8.
    """

    bboxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to_target(self) -> dict[str, torch.Tensor]:
        """The shard format ``{"bboxes", "labels", "masks"}`` (CPU tensors)."""
        return {"bboxes": self.bboxes.detach().float().cpu(), "labels": self.labels.detach().long().cpu(),
                "masks": self.masks.detach().to(torch.uint8).cpu()}

    def resized(self, size: int) -> "LabelSet":
        """The same labels on a ``size`` canvas (boxes scaled, masks nearest-neighbour)."""
        old = self.masks.shape[-1]
        if size == old:
            return self
        f = size / old
        masks = self.masks
        if masks.numel():
            masks = F.interpolate(masks[None].float(), size=(size, size), mode="nearest")[0].to(torch.uint8)
        else:
            masks = masks.new_zeros((0, size, size))
        return LabelSet(self.bboxes * f, self.labels.clone(), masks)


@dataclass
class DetSynthConfig:
    """Everything that defines a detection synthetic set (stored in the manifest's ``hparams``)."""

    image_size: int = 640
    batch_size: int = 12
    labels: str = "sampled"
    iterations: int = 2000
    lr: float = 0.2
    warmup: int = 100
    det_weight: float = 10.0
    pse_weight: float = 1.0
    tv_weight: float = 0.001
    tv_reference_numel: int = DFQ_TV_REFERENCE_NUMEL
    clamp: bool = True
    pse_drop_first_token: bool = True
    amp: bool = False
    # adaptive label sampling (labels == "sampled")
    label_size: int = 160
    label_iterations: int = 3000
    label_warmup: int = 100
    relabel_every: int = 100
    relabel_start: int = 800
    relabel_end: int = 2800
    conf: float = 0.2
    overlap_iou: float = 0.35
    min_area: float = 0.01
    max_area: float = 0.85

    def __post_init__(self) -> None:
        if self.labels not in ("sampled", "coco"):
            raise ValueError(f"labels must be 'sampled' or 'coco', not {self.labels!r}")
        for name in ("image_size", "label_size"):
            v = getattr(self, name)
            if v < 32 or v % 32:
                raise ValueError(f"{name} must be a positive multiple of 32 (the detector's padding "
                                 f"divisor), got {v}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.min_area < self.max_area <= 1.0:
            raise ValueError(f"need 0 <= min_area < max_area <= 1, got {self.min_area}, {self.max_area}")
        if self.relabel_every < 1:
            raise ValueError(f"relabel_every must be >= 1, got {self.relabel_every}")

    def inversion(self, stage: str = "final") -> InversionConfig:
        """The engine's config for the ``final`` images or the ``label`` (ALS) stage."""
        its, warm = ((self.label_iterations, self.label_warmup) if stage == "label"
                     else (self.iterations, self.warmup))
        return InversionConfig(iterations=its, lr=self.lr, betas=(0.5, 0.9), warmup=min(warm, its),
                               task_weight=self.det_weight, pse_weight=self.pse_weight,
                               tv_weight=self.tv_weight, tv_reference_numel=self.tv_reference_numel,
                               clamp=self.clamp, pse_drop_first_token=self.pse_drop_first_token)

    def relabel_now(self, t: int) -> bool:
        """Relabel after ``t`` image updates (every ``relabel_every`` in ``[relabel_start, relabel_end]``)."""
        return self.relabel_start <= t <= self.relabel_end and t % self.relabel_every == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.labels != "sampled":
            for k in ("label_size", "label_iterations", "label_warmup", "relabel_every", "relabel_start",
                      "relabel_end", "conf", "overlap_iou", "min_area", "max_area"):
                d.pop(k)
        return d


# ----------------------------------------------------------------------------------- label rules
def sample_seed_label(size: int, num_classes: int, generator: torch.Generator) -> LabelSet:
    """One-box seed (ALS step A): ``w, h ~ U(0.2, 0.8)·size`` independently, centre uniform such that
    the box lies inside the canvas, class uniform over ``num_classes``, mask = the filled box."""
    u = torch.rand(4, generator=generator, dtype=torch.float64)
    w, h = (0.2 + 0.6 * u[0]) * size, (0.2 + 0.6 * u[1]) * size
    cx, cy = w / 2 + u[2] * (size - w), h / 2 + u[3] * (size - h)
    cls = int(torch.randint(num_classes, (1,), generator=generator))
    box = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]], dtype=torch.float32)
    return LabelSet(box, torch.tensor([cls], dtype=torch.long), box_masks(box, size))


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, size, size)`` uint8 filled rectangles of xyxy ``boxes`` (pixel centres inside the box)."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    b = boxes.float().cpu()
    inx = (c[None, :] >= b[:, 0:1]) & (c[None, :] < b[:, 2:3])   # (n, W)
    iny = (c[None, :] >= b[:, 1:2]) & (c[None, :] < b[:, 3:4])   # (n, H)
    return (iny[:, :, None] & inx[:, None, :]).to(torch.uint8)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes ``a (n, 4)`` and ``b (m, 4)`` → ``(n, m)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def als_update(target: LabelSet, pred_bboxes: torch.Tensor, pred_scores: torch.Tensor,
               pred_labels: torch.Tensor, pred_masks: Optional[torch.Tensor], canvas: tuple[int, int],
               conf: float = 0.2, overlap_iou: float = 0.35, min_area: float = 0.01,
               max_area: float = 0.85) -> tuple[LabelSet, dict[str, int]]:
    """One ALS label update of one image (DFQ ``FpSampler.sample``, §2.1.2 step B).

    Predictions with score > ``conf`` form P; with targets T (both non-empty):

    * a prediction is added if its max IoU with T is < ``overlap_iou`` and its normalised area
      ``w·h / (W·H)`` is in ``(min_area, max_area)``; its mask is the predicted mask > 0.5 (the
      filled box when the teacher gives none);
    * if |T| > 1, a target whose max IoU with P is < ``overlap_iou`` is removed; if that would remove
      all, the target with the largest max IoU (first on ties) is kept.

    pred_bboxes ``(k, 4)`` xyxy, pred_scores ``(k,)``, pred_labels ``(k,)``, pred_masks ``(k, H, W)``
    or None; canvas ``(H, W)``. Returns the new labels and ``{"added", "removed"}``.
    """
    keep = (pred_scores > conf).cpu()
    p_boxes, p_labels = pred_bboxes.cpu()[keep].float(), pred_labels.cpu()[keep].long()
    p_masks = pred_masks.cpu()[keep] if pred_masks is not None else None
    if len(p_boxes) == 0 or len(target) == 0:
        return target, {"added": 0, "removed": 0}
    iou = box_iou(p_boxes, target.bboxes.float().cpu())            # (|P|, |T|)
    h, w = canvas
    area = ((p_boxes[:, 2] - p_boxes[:, 0]) * (p_boxes[:, 3] - p_boxes[:, 1])) / float(h * w)
    add = (iou.max(dim=1).values < overlap_iou) & (area > min_area) & (area < max_area)
    remove = torch.zeros(len(target), dtype=torch.bool)
    if len(target) > 1:
        t_best = iou.max(dim=0).values
        remove = t_best < overlap_iou
        if bool(remove.all()):
            remove[int(torch.argmax(t_best))] = False
    keep_t = ~remove
    if p_masks is not None:
        add_masks = (p_masks[add].float() > 0.5).to(torch.uint8).cpu()
    else:
        add_masks = box_masks(p_boxes[add], target.masks.shape[-1])
    new = LabelSet(torch.cat([target.bboxes.float().cpu()[keep_t], p_boxes[add]]),
                   torch.cat([target.labels.cpu()[keep_t], p_labels[add]]),
                   torch.cat([target.masks.cpu()[keep_t], add_masks]))
    return new, {"added": int(add.sum()), "removed": int(remove.sum())}


# ------------------------------------------------------------------------------- mmdet interface
def num_classes_of(model: nn.Module) -> int:
    """Classes of an mmdet two-stage detector (last bbox head for Cascade R-CNN)."""
    head = model.roi_head.bbox_head
    head = head[-1] if isinstance(head, (nn.ModuleList, list)) else head
    return int(head.num_classes)


def square_meta(size: int, img_shape: Optional[tuple[int, int]] = None, **extra: Any) -> dict[str, Any]:
    """Metainfo of an image drawn on a ``size`` × ``size`` canvas (``img_shape`` the valid region)."""
    shape = tuple(int(v) for v in (img_shape or (size, size)))
    meta = {"img_shape": shape, "ori_shape": shape, "pad_shape": (size, size),
            "batch_input_shape": (size, size), "scale_factor": (1.0, 1.0)}
    meta.update(extra)
    return meta


def make_data_samples(labels: Sequence[Optional[LabelSet]], metas: Sequence[dict], device: Any) -> list:
    """``DetDataSample`` per image with ``gt_instances`` (bboxes, labels, ``BitmapMasks``)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    out = []
    for lab, meta in zip(labels, metas):
        ds = DetDataSample(metainfo=dict(meta))
        if lab is not None:
            gt = InstanceData()
            gt.bboxes = lab.bboxes.float().to(device)
            gt.labels = lab.labels.long().to(device)
            size = lab.masks.shape[-2:]
            gt.masks = BitmapMasks(lab.masks.cpu().numpy().astype(np.uint8), int(size[0]), int(size[1]))
            ds.gt_instances = gt
        out.append(ds)
    return out


def detector_loss(model: nn.Module, data_samples: list, amp: bool = False):
    """Task loss for :func:`~qwt_core.inversion.invert`: the detector's training loss (sum of every
    ``*loss*`` term, RPN + RoI + mask, all stages of a Cascade) on ``data_samples``. The list may be
    replaced in place between iterations (relabelling)."""

    def loss(x: torch.Tensor, it: int) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp and x.device.type == "cuda"):
            losses = model.loss(x, data_samples)
        total, _ = model.parse_losses(losses)
        return total.float()

    return loss


@torch.no_grad()
def teacher_predictions(model: nn.Module, x: torch.Tensor, metas: Sequence[dict]) -> list:
    """``model.predict`` on ``x`` (no rescale): per image ``pred_instances`` (bboxes, scores, labels,
    masks)."""
    samples = make_data_samples([None] * len(metas), metas, x.device)
    return [s.pred_instances for s in model.predict(x, samples, rescale=False)]


# ------------------------------------------------------------------------------------ COCO labels
class CocoLabelSource:
    """Real COCO train annotations drawn on a ``size`` canvas (no image is read).

    Images without (non-crowd, non-degenerate) objects are skipped; the order is a seeded shuffle of
    the dataset, so global index ``i`` always names the same image. Images larger than the canvas are
    scaled down to fit (keeping the aspect ratio); smaller ones are kept at their size (DFQ).
    """

    def __init__(self, dataset_cfg: Any, size: int, seed: int) -> None:
        from mmdet.registry import DATASETS

        cfg = copy.deepcopy(dataset_cfg)
        cfg["pipeline"] = []
        cfg["filter_cfg"] = dict(filter_empty_gt=True, min_size=1)
        cfg["test_mode"] = False
        try:
            self.dataset = DATASETS.build(cfg)
        except Exception as exc:  # noqa: BLE001 - missing files / bad config: one line
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise SystemExit(f"error: cannot read the COCO train annotations for --labels coco ({msg}); "
                             "set data_root in configs/_base_/datasets/coco_instance.py or use --labels sampled")
        self.size = size
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        self.order = [i for i in order if self._instances(self.dataset.get_data_info(i))]

    @staticmethod
    def _instances(info: dict) -> list[dict]:
        return [o for o in info.get("instances", []) if not o.get("ignore_flag", 0)
                and o["bbox"][2] - o["bbox"][0] >= 1 and o["bbox"][3] - o["bbox"][1] >= 1]

    def __len__(self) -> int:
        return len(self.order)

    @staticmethod
    def _mask(ann: Any, h: int, w: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        if isinstance(ann, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(ann, h, w))
        elif isinstance(ann.get("counts"), list):
            rle = mask_utils.frPyObjects(ann, h, w)
        else:
            rle = ann
        return mask_utils.decode(rle).astype(np.uint8)

    def get(self, i: int) -> tuple[LabelSet, dict]:
        """Labels and metainfo of the ``i``-th image of the shuffled order."""
        import cv2

        info = self.dataset.get_data_info(self.order[i])
        h, w = int(info["height"]), int(info["width"])
        s = min(1.0, self.size / h, self.size / w)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        objs = self._instances(info)
        boxes = torch.tensor([o["bbox"] for o in objs], dtype=torch.float32) * s
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh)
        masks = np.zeros((len(objs), self.size, self.size), np.uint8)
        for k, o in enumerate(objs):
            m = self._mask(o["mask"], h, w)
            if (nh, nw) != (h, w):
                m = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST)
            masks[k, :nh, :nw] = m
        labels = torch.tensor([int(o["bbox_label"]) for o in objs], dtype=torch.long)
        meta = square_meta(self.size, (nh, nw), source_img_id=int(info.get("img_id", -1)))
        return LabelSet(boxes, labels, torch.from_numpy(masks)), meta


# -------------------------------------------------------------------------------------- generator
class DetectionSynthesizer:
    """Makes one generation batch: labels (ALS or COCO), then the final images.

    ``make_batch(batch, indices)`` has the signature :func:`qwt_core.inversion.synthesize_batches`
    expects. Everything random is seeded per global image index (noise, seed labels) or per batch
    (from its first index: RoI sampling), so a batch is the same whichever process makes it.
    """

    def __init__(self, model: nn.Module, cfg: DetSynthConfig, seed: int, mean: Sequence[float],
                 std: Sequence[float], coco: Optional[CocoLabelSource] = None, progress: bool = True) -> None:
        if cfg.labels == "coco" and coco is None:
            raise ValueError("labels='coco' needs a CocoLabelSource")
        self.model, self.cfg, self.seed, self.coco, self.progress = model, cfg, seed, coco, progress
        self.num_classes = num_classes_of(model)
        self.bounds = pixel_bounds(mean, std, 255.0)
        self.device = next(model.parameters()).device
        self.stats: dict[str, list[float]] = {"final_s_per_it": [], "label_s_per_it": [], "relabels": []}
        self.last_history: list[dict[str, float]] = []

    # ALS ------------------------------------------------------------------------------------
    def seed_labels(self, indices: Sequence[int], size: int) -> list[LabelSet]:
        """One-box seed labels of the images ``indices`` (generator ``seed + offset + i`` each)."""
        return [sample_seed_label(size, self.num_classes,
                                  torch.Generator().manual_seed(self.seed + SEED_LABEL_OFFSET + int(i)))
                for i in indices]

    def sample_labels(self, indices: Sequence[int]) -> list[LabelSet]:
        """ALS step B at ``label_size``: alternate image updates and teacher relabelling."""
        cfg, size = self.cfg, self.cfg.label_size
        labels = self.seed_labels(indices, size)
        metas = [square_meta(size) for _ in indices]
        samples = make_data_samples(labels, metas, self.device)
        x0 = init_noise(indices, (3, size, size), self.seed, self.device, offset=LABEL_NOISE_OFFSET)
        counts = {"added": 0, "removed": 0}

        def relabel(it: int, x: torch.Tensor) -> None:
            if not cfg.relabel_now(it + 1):
                return
            preds = teacher_predictions(self.model, x, metas)
            for b, pred in enumerate(preds):
                masks = pred.masks if "masks" in pred else None
                labels[b], c = als_update(labels[b], pred.bboxes, pred.scores, pred.labels, masks,
                                          (size, size), cfg.conf, cfg.overlap_iou, cfg.min_area, cfg.max_area)
                counts["added"] += c["added"]
                counts["removed"] += c["removed"]
            samples[:] = make_data_samples(labels, metas, self.device)

        res = self._invert(x0, samples, cfg.inversion("label"), relabel, "ALS labels")
        self.stats["label_s_per_it"].append(res.seconds / max(1, len(res.history)))
        self.stats["relabels"].append(float(counts["added"] + counts["removed"]))
        return labels

    # images ------------------------------------------------------------------------------------
    def _invert(self, x0: torch.Tensor, samples: list, icfg: InversionConfig, callback, desc: str):
        with frozen(self.model), explicit_attention(self.model):
            priors = []
            if icfg.pse_weight > 0:
                priors.append(PatchSimilarityPrior(self.model, icfg.pse_drop_first_token,
                                                   icfg.pse_grid, icfg.pse_bandwidth))
            try:
                return invert(x0, detector_loss(self.model, samples, self.cfg.amp), icfg, priors,
                              bounds=self.bounds, callback=callback, progress=self.progress, desc=desc)
            finally:
                for p in priors:
                    p.remove()

    def make_batch(self, batch: int, indices: list[int]) -> tuple[torch.Tensor, list[dict], list[dict]]:
        cfg, size = self.cfg, self.cfg.image_size
        torch.manual_seed(batch_seed(self.seed, indices))
        if cfg.labels == "coco":
            pairs = [self.coco.get(i) for i in indices]
            labels, metas = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            labels = [lab.resized(size) for lab in self.sample_labels(indices)]
            metas = [square_meta(size) for _ in indices]
        for i, m in zip(indices, metas):
            m["index"] = int(i)
        samples = make_data_samples(labels, metas, self.device)
        x0 = init_noise(indices, (3, size, size), self.seed, self.device)
        res = self._invert(x0, samples, cfg.inversion("final"), None, f"images (batch {batch})")
        self.stats["final_s_per_it"].append(res.seconds / max(1, len(res.history)))
        self.last_history = res.history
        return res.images.cpu(), [lab.to_target() for lab in labels], metas
